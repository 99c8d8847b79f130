"""Write configs/<dataset>/<method>_<backbone>.yaml: the papers' recipes, one file per reported row.

Run from the repository root: `python scripts/make_configs.py`. Recipes are from ../shared/METHODS.md.
Manifests are expected where `vidret data convert --dataset D --out data/D` writes them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

# dataset -> (frames, words, test protocol, test split file, long-video recipe)
DATASETS = {
    "msrvtt": (12, 32, "single", "test.jsonl", False),
    "msvd": (12, 32, "multi", "test.jsonl", False),
    "lsmdc": (12, 32, "single", "test.jsonl", False),
    "didemo": (32, 64, "paragraph", "test.jsonl", True),
    "activitynet": (32, 64, "paragraph", "val.jsonl", True),
    "vatex": (12, 32, "multi", "test.jsonl", False),
}

# (method, backbone) -> datasets the papers report, with the recipe
ROWS = {
    ("mv_adapter", "ViT-B-16"): ["msrvtt", "msvd", "lsmdc", "didemo", "activitynet"],
    ("cross_modal", "ViT-B-32"): ["msrvtt", "msvd", "vatex", "activitynet", "didemo"],
    ("full", "ViT-B-16"): ["msrvtt", "msvd", "lsmdc", "didemo", "activitynet"],
    ("full", "ViT-B-32"): ["msrvtt", "msvd", "vatex", "activitynet", "didemo"],
    ("frozen", "ViT-B-16"): ["msrvtt", "msvd", "lsmdc", "didemo", "activitynet"],
    ("frozen", "ViT-B-32"): ["msrvtt", "msvd", "vatex", "activitynet", "didemo"],
    ("bottleneck", "ViT-B-16"): ["msrvtt", "msvd", "lsmdc", "didemo", "activitynet"],
    ("st_adapter", "ViT-B-16"): ["msrvtt", "msvd", "lsmdc", "didemo", "activitynet"],
    ("convpass", "ViT-B-16"): ["msrvtt", "msvd", "lsmdc", "didemo", "activitynet"],
    ("lora", "ViT-B-16"): ["msrvtt"],
    ("prompt", "ViT-B-16"): ["msrvtt"],
}


def recipe(method: str, backbone: str, dataset: str) -> dict:
    frames, words, protocol, test_file, long = DATASETS[dataset]
    cfg: dict = {
        "backbone": backbone,
        "method": method,
        "data": {
            "train_manifest": f"data/{dataset}/train.jsonl",
            "test_manifest": f"data/{dataset}/{test_file}",
            "num_frames": frames,
            "max_words": words,
            "test_protocol": protocol,
            "cache_dir": f"cache/{dataset}",
        },
        "optim": {"betas": [0.9, 0.98], "eps": 1e-6, "warmup_ratio": 0.1, "weight_decay": 0.2, "grad_clip": 1.0},
        "global_batch": 128,
        "epochs": 5,
        "precision": "bf16",
        "out_dir": f"runs/{dataset}/{method}_{backbone}",
    }
    options: dict = {}
    if method == "mv_adapter":
        cfg["preset"] = dataset
        cfg["optim"].update(lr=5e-6, backbone_lr=1e-7, backbone_weight_decay=0.2)  # paper lr; biases as released
        if long:
            cfg["global_batch"], cfg["epochs"] = 64, 15
    elif method == "cross_modal":
        cfg["preset"] = dataset
        cfg["optim"]["lr"] = 1e-5
        if dataset == "activitynet":
            cfg["epochs"] = 20
        if dataset in ("activitynet", "didemo"):
            cfg["data"].update(num_frames=64, max_words=64)
    elif method == "full":
        cfg["optim"]["lr"] = 1e-7  # CLIP4Clip: lr 1e-4 x coef_lr 1e-3 on CLIP weights
        if long:
            cfg["global_batch"], cfg["epochs"] = 64, 15
    elif method == "frozen":
        cfg["epochs"] = 1  # zero-shot: evaluate with `vidret eval`, nothing to train
    else:  # PETL baselines of the MV-Adapter tables: MV-Adapter's recipe
        cfg["optim"]["lr"] = 5e-6
        if long:
            cfg["global_batch"], cfg["epochs"] = 64, 15
    if options:
        cfg["method_options"] = options
    return cfg


def main() -> None:
    root = Path("configs")
    n = 0
    for (method, backbone), datasets in ROWS.items():
        for ds in datasets:
            path = root / ds / f"{method}_{backbone}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            header = f"# {method} on {ds}, {backbone}: the paper's recipe (../shared/METHODS.md).\n"
            header += f"# vidret train {path}   (set data.* paths to your manifests, or key=value overrides)\n"
            path.write_text(header + yaml.safe_dump(recipe(method, backbone, ds), sort_keys=False))
            n += 1
    print(f"wrote {n} config files under {root}/")


if __name__ == "__main__":
    main()
