#!/usr/bin/env bash
# The quickstart builds with `cargo build --workspace --bins`, the tests with
# `cargo test --workspace`. Cargo compiles a crate once per feature set, so a crate that the
# dev-dependencies give more features would be compiled twice (minutes on 2 cores). This
# prints every crate whose features differ between the two graphs; it must print nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
tree() { cargo tree --workspace -e "$1" -f "{p} {f}" --prefix none | sed 's/ (\*)$//' | sort -u; }
normal=$(tree normal,build)
all=$(tree normal,build,dev)
# crates of the normal graph whose feature list is not the same in the full graph
diff=$(comm -23 <(echo "$normal") <(echo "$all"))
if [ -n "$diff" ]; then
  echo "features differ between cargo build and cargo test for:" >&2
  echo "$diff" >&2
  exit 1
fi
echo "one feature set for cargo build --workspace and cargo test --workspace"
