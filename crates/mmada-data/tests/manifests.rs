//! The shipped manifests in `data_manifests/` parse and validate; unknown keys are
//! rejected.

mod common;

use mmada_data::{Manifest, Task};

#[test]
fn shipped_manifests_parse() {
    let dir = common::repo_root().join("data_manifests");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let m = Manifest::from_file(&p).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                p.file_stem().unwrap().to_str().unwrap(),
                m.name,
                "file name = manifest name"
            );
            names.push(m.name);
        }
    }
    names.sort();
    for want in [
        "gsm8k",
        "math500",
        "s1k",
        "limo",
        "openthoughts",
        "acemath_instruct",
        "alpaca",
        "llava_v1_5_mix665k",
        "geo170k",
        "clevr",
        "ai2d",
        "journeydb",
        "laion_aesthetics",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing manifest {want}: {names:?}"
        );
    }
}

#[test]
fn unknown_keys_and_bad_combinations_are_rejected() {
    let ok = "name: x\ntask: chat\nsource: { path: a.jsonl }\nformat: jsonl\nfields: { question: q, answer: a }\nlicense: MIT\nsplit: train\n";
    assert_eq!(Manifest::from_yaml(ok, "ok").unwrap().task, Task::Chat);
    let e = Manifest::from_yaml(&format!("{ok}shuffle: true\n"), "m.yaml").unwrap_err();
    assert!(e.to_string().contains("unknown field `shuffle`"), "{e}");
    let e = Manifest::from_yaml(&ok.replace("question: q", "questoin: q"), "m.yaml").unwrap_err();
    assert!(e.to_string().contains("unknown field `questoin`"), "{e}");
    let e = Manifest::from_yaml(&ok.replace("task: chat", "task: t2i"), "m.yaml").unwrap_err();
    assert!(e.to_string().contains("task `t2i` needs"), "{e}");
    let both = ok.replace(
        "{ path: a.jsonl }",
        "{ path: a.jsonl, hf_repo: a/b, files: [x] }",
    );
    assert!(Manifest::from_yaml(&both, "m.yaml").is_err());
}
