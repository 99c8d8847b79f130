"""Write configs/<dataset>/<method>_<backbone>[_<variant>].yaml: one file per reported row, with the official recipe.

Run from the repository root: `python scripts/make_configs.py`. Recipes: ../shared/METHODS.md and the official
code each header names (docs/methods.md, "Recipes", lists every choice and every deliberate departure).
Manifests are expected where `vidret data convert --dataset D --out data/D` writes them.
`vidret recipe CONFIG` prints the effective recipe of any of these files.
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

# (method, backbone) -> datasets the papers report
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

# MV-Adapter datasets whose paper text and released config differ (METHODS.md): variant -> (preset, what it is)
MV_VARIANTS = {
    "msrvtt": {
        "paper": ("msrvtt_paper", "the paper's variant: CMT Down-In, layers 10-11"),
        "released": ("msrvtt", "the released code's variant: CMT Down-Out, layers 10-11"),
    },
    "didemo": {
        "paper": ("didemo_paper", "the paper's variant: CMT Down-In, layers 10-11"),
        "released": ("didemo", "the released code's variant: CMT Down-Out, layers 10-11"),
    },
    "activitynet": {
        "paper": ("activitynet_paper", "the paper's variant: CMT Down-In, layer 11, no input LayerNorm"),
        "released": ("activitynet", "the released code's variant: input LayerNorm in every adapter"),
    },
}

# The official codes' training recipes (the files each follows are named in the headers below).
MV_ADAPTER_RECIPE = {  # github.com/zhangbw17/MV-Adapter
    "optim": {
        "name": "bert_adam",
        "schedule": "bert_warmup_cosine",
        "per_tensor_clip": 1.0,
        "grad_clip": 1.0,
        "decay_rule": "mvadapter_names",
    },
    "data": {"caption_mode": "all_pairs", "train_sampling": "mvadapter_floor", "eval_sampling": "mvadapter_floor"},
}
MV_ADAPTER_FILES = (
    "github.com/zhangbw17/MV-Adapter:\n"
    "#   main_task_retrieval.py; runner/retrieval_runner.py (global grad clip 1.0);\n"
    "#   optimizer/build.py + optimizer/bert_adam.py (BertAdam, warmup_cosine, per-tensor clip 1.0, decay on every\n"
    '#   adapter tensor whose name lacks "bias", CLIP biases lr 1e-7 decay 0.2); dataloaders/retrieval_dt.py (every\n'
    "#   (video, caption) pair per epoch; frame floor(i*N/T), train and test); configs/<dataset>/_adapter_base.py\n"
    "#   (lr 5e-6; 5 epochs, batch 16 x 8 GPUs; DiDeMo/ActivityNet 15 epochs, 8 x 8, 32 frames / 64 words)"
)
CMA_RECIPE = {  # github.com/LeapLabTHU/Cross-Modal-Adapter
    "optim": {
        "name": "bert_adam",
        "schedule": "bert_warmup_cosine",
        "per_tensor_clip": 0.0,
        "grad_clip": 1.0,
        "decay_rule": "mvadapter_names",
    },
    "data": {"caption_mode": "all_pairs", "train_sampling": "cma_linspace", "eval_sampling": "cma_linspace"},
}
CMA_FILES = (
    "github.com/LeapLabTHU/Cross-Modal-Adapter:\n"
    "#   train.py (CLIP4Clip-derived: BertAdam via --optimizer adam with\n"
    "#   --schedule warmup_cosine, max_grad_norm=0.0 (no per-tensor clip), global clip 1.0, decay on adapter tensors\n"
    '#   whose name lacks "bias"); modules/optimization.py (BertAdam); dataloaders_drl/dataloader_retrieval_images.py\n'
    "#   (every (video, caption) pair; frames np.linspace(0, N-1, T, dtype=int), train and test)"
)
CLIP4CLIP_RECIPE = {  # github.com/ArrowLuo/CLIP4Clip
    "optim": {
        "name": "bert_adam",
        "schedule": "bert_warmup_cosine",
        "per_tensor_clip": 1.0,
        "grad_clip": 1.0,
        "decay_rule": "mvadapter_names",
    },
    "data": {"caption_mode": "all_pairs", "train_sampling": "cma_linspace", "eval_sampling": "cma_linspace"},
}
CLIP4CLIP_FILES = (
    "github.com/ArrowLuo/CLIP4Clip:\n"
    "#   main_task_retrieval.py (BertAdam warmup_cosine, per-tensor clip 1.0, global clip 1.0,\n"
    "#   CLIP lr = lr x coef_lr = 1e-7); dataloaders/rawvideo_util.py (slice_framepos 2:\n"
    "#   np.linspace(..., dtype=int)).\n"
    "#   Departure: CLIP4Clip does not decay CLIP's biases; vidret decays every trained backbone tensor at\n"
    "#   optim.backbone_weight_decay (0.2), as MV-Adapter's code does"
)


def recipe(method: str, backbone: str, dataset: str, preset: str | None) -> dict:
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
    }
    official: dict | None = None
    if method == "mv_adapter":
        cfg["preset"] = preset
        cfg["optim"].update(lr=5e-6, backbone_lr=1e-7, backbone_weight_decay=0.2)  # paper lr; biases as released
        official = MV_ADAPTER_RECIPE
        if long:
            cfg["global_batch"], cfg["epochs"] = 64, 15
    elif method == "cross_modal":
        cfg["preset"] = dataset
        cfg["optim"]["lr"] = 1e-5
        official = CMA_RECIPE
        if dataset == "activitynet":
            cfg["epochs"] = 20
        if dataset in ("activitynet", "didemo"):
            cfg["data"].update(num_frames=64, max_words=64)
    elif method == "full":
        # ViT-B-16: MV-Adapter's table, trained in its framework (all CLIP tensors lr 1e-7, decay 0.2);
        # ViT-B-32: CLIP4Clip (lr 1e-4 x coef_lr 1e-3 on CLIP weights)
        cfg["optim"]["lr"] = 1e-7
        official = MV_ADAPTER_RECIPE if backbone == "ViT-B-16" else CLIP4CLIP_RECIPE
        if long:
            cfg["global_batch"], cfg["epochs"] = 64, 15
    elif method == "frozen":
        cfg["epochs"] = 1  # zero-shot: evaluate with `vidret eval`, nothing to train
        rule = "mvadapter_floor" if backbone == "ViT-B-16" else "cma_linspace"
        cfg["data"].update(train_sampling=rule, eval_sampling=rule)
    else:  # PETL baselines of the MV-Adapter tables: MV-Adapter's recipe
        cfg["optim"]["lr"] = 5e-6
        official = MV_ADAPTER_RECIPE
        if long:
            cfg["global_batch"], cfg["epochs"] = 64, 15
    if official is not None:
        cfg["optim"].update(official["optim"])
        cfg["data"].update(official["data"])
    return cfg


def header(method: str, backbone: str, dataset: str, variant: str | None, path: Path) -> str:
    what = f"# {method} on {dataset}, {backbone}"
    if method == "mv_adapter":
        desc = MV_VARIANTS[dataset][variant][1] if variant else "paper and released code agree on this dataset"
        lines = [
            f"{what}: the MV-Adapter paper row; {desc}.",
            f"# Training recipe: the official code, {MV_ADAPTER_FILES}.",
        ]
    elif method == "cross_modal":
        lines = [f"{what}: the Cross-Modal Adapter paper row.", f"# Training recipe: the official code, {CMA_FILES}."]
    elif method == "full" and backbone == "ViT-B-16":
        lines = [
            f"{what}: full fine-tuning (CLIP4Clip meanP), the MV-Adapter table's baseline row.",
            f"# Training recipe: MV-Adapter's framework (configs/<dataset>/_base.py), {MV_ADAPTER_FILES}.",
        ]
    elif method == "full":
        lines = [
            f"{what}: full fine-tuning, the CLIP4Clip row the Cross-Modal Adapter paper compares with.",
            f"# Training recipe: the official code, {CLIP4CLIP_FILES}.",
        ]
    elif method == "frozen":
        source = "MV-Adapter's dataloaders/retrieval_dt.py" if backbone == "ViT-B-16" else "CLIP4Clip's linspace"
        lines = [
            f"{what}: zero-shot CLIP (meanP), nothing trained.",
            f"# Frames as the official code of the tables using this backbone samples them ({source}).",
        ]
    else:
        lines = [
            f"{what}: a baseline of the MV-Adapter tables (no official code was released for it).",
            f"# Training recipe: MV-Adapter's, as its framework would train it: {MV_ADAPTER_FILES}.",
        ]
    lines += [
        '# Deliberate departures (fp32 master weights, ...): docs/methods.md, "Recipes". Print the effective',
        f"# recipe with: vidret recipe {path}",
        f"# vidret train {path}   (set data.* paths to your manifests, or key=value overrides)",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    root = Path("configs")
    n = 0
    for (method, backbone), datasets in ROWS.items():
        for ds in datasets:
            variants: dict = MV_VARIANTS.get(ds, {}) if method == "mv_adapter" else {}
            for variant in list(variants) or [None]:
                stem = f"{method}_{backbone}" + (f"_{variant}" if variant else "")
                preset = variants[variant][0] if variant else (ds if method == "mv_adapter" else None)
                path = root / ds / f"{stem}.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                cfg = recipe(method, backbone, ds, preset)
                cfg["out_dir"] = f"runs/{ds}/{stem}"
                path.write_text(header(method, backbone, ds, variant, path) + yaml.safe_dump(cfg, sort_keys=False))
                n += 1
    print(f"wrote {n} config files under {root}/")


if __name__ == "__main__":
    main()
