#!/usr/bin/env bash
# CPU backends side by side (issue 18, item 3), in one run on the same 2 threads:
#   * burn Flex (our CPU default), burn ndarray (matrixmultiply; or OpenBLAS with
#     FEATURES=openblas, which needs Debian's libopenblas-dev) and burn-candle:
#     benches/backends.rs (matmul GFLOP/s at the training step's shapes, the element-wise and
#     reduction ops of its profile on a [256, 58560] head chunk, the whole training step);
#   * PyTorch (the peer's library) and numpy (its bundled OpenBLAS) on the same matmuls and ops.
# Prints one table. Needs python3 with torch and numpy (PEER_PYTHON=…/python).
#
#   PEER_PYTHON=../venv-torch/bin/python bash scripts/bench_backends.sh
#   FEATURES=openblas MMADA_PROBE_BACKENDS=ndarray bash scripts/bench_backends.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PEER_PYTHON:-python3}
FEATURES=${FEATURES:-backends}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-2}
bin=$(cargo test --features "$FEATURES" --bench backends --no-run 2>&1 \
  | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -n 1)
out=$(mktemp)
"$bin" --bench | tee "$out"
"$PY" - >>"$out" <<'PYEOF' || echo "no torch/numpy in $PY: the python columns are skipped" >&2
import json, statistics, time
import numpy as np
import torch
torch.set_num_threads(2)
shapes = [(256, 256, 58560), (256, 58560, 256), (1024, 256, 688), (1024, 688, 256), (512, 256, 58560)]
def med(f, reps=5):
    f(); ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
for m, k, n in shapes:
    a, b = torch.rand(m, k), torch.rand(k, n)
    s = med(lambda: a @ b)
    print(json.dumps({"impl": "torch", "backend": "torch " + torch.__version__, "op": "matmul", "shape": f"{m}x{k}x{n}", "gflops": 2 * m * k * n / s / 1e9}))
    an, bn = a.numpy(), b.numpy()
    s = med(lambda: an @ bn)
    print(json.dumps({"impl": "numpy", "backend": "numpy " + np.__version__, "op": "matmul", "shape": f"{m}x{k}x{n}", "gflops": 2 * m * k * n / s / 1e9}))
x, y = torch.rand(256, 58560), torch.rand(256, 58560)
for op, f in [("exp", lambda: x.exp()), ("add", lambda: x + y), ("mul_scalar", lambda: x * 0.5),
              ("sum_dim", lambda: x.sum(1, keepdim=True)), ("max_dim", lambda: x.max(1, keepdim=True)),
              ("log_softmax", lambda: torch.log_softmax(x, 1))]:
    print(json.dumps({"impl": "torch", "backend": "torch " + torch.__version__, "op": op, "shape": "256x58560", "ms": med(f) * 1e3}))
PYEOF
python3 - "$out" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
backends = list(dict.fromkeys(r['backend'] for r in rows))
keys = list(dict.fromkeys((r['op'], r['shape']) for r in rows))
def cell(b, k):
    for r in rows:
        if r['backend'] == b and (r['op'], r['shape']) == k:
            if 'error' in r: return 'fails'
            for u in ('gflops', 'ms', 'seconds'):
                if u in r: return f"{r[u]:.1f}" if u != 'seconds' else f"{r[u]:.2f}"
    return ''
unit = lambda op: 'GFLOP/s' if op == 'matmul' else ('s' if op == 'train_step' else 'ms')
print('| op | shape | unit | ' + ' | '.join(backends) + ' |')
print('|---' * (3 + len(backends)) + '|')
for k in keys:
    print(f'| {k[0]} | {k[1]} | {unit(k[0])} | ' + ' | '.join(cell(b, k) for b in backends) + ' |')
PYEOF
