"""The int8 text tower's effect on retrieval: fp32 vs int8 (`vidret search --quantize`) on one index's captions.

    python scripts/quantize_recall.py INDEX MANIFEST [--backbone NAME_OR_PATH]

INDEX is a pooled index built from MANIFEST (`vidret index --adapter A --manifest MANIFEST --out INDEX`); every
caption of MANIFEST is a query. Prints, for the fp32 and the int8 text tower: T2V R@1 / R@10 against the
manifest's ground truth (exact search), the share of the fp32 top-10 that int8 also returns (recall@10 against
fp32), and the text tower's time per query (one thread, batches of 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

from vidret.data.manifest import read_manifest
from vidret.retrieval.index import VideoIndex
from vidret.retrieval.query import encode_texts, open_text_model_for_index, quantize_text_tower


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index")
    p.add_argument("manifest")
    p.add_argument("--backbone", default=None)
    p.add_argument("--timed", type=int, default=50, help="queries timed one by one")
    args = p.parse_args()
    torch.set_num_threads(1)
    index = VideoIndex.load(args.index)
    if index.kind != "pooled":
        raise SystemExit("a pooled index is needed (the int8 path is for pooled heads)")
    entries = read_manifest(args.manifest)
    queries = [(c, e.video_id) for e in entries for c in e.captions]
    texts = [q for q, _ in queries]
    truth = torch.tensor([index.row_of(v) for _, v in queries])
    fp32 = open_text_model_for_index(index, args.backbone)
    int8 = copy.deepcopy(fp32)  # the same weights, quantised below
    n_q = quantize_text_tower(int8)
    words = index.settings.max_words
    out: dict[str, object] = {"queries": len(texts), "videos": len(index), "quantized_linears": n_q}
    top: dict[str, torch.Tensor] = {}
    for name, model in (("fp32", fp32), ("int8", int8)):
        feats = encode_texts(model, texts, words)
        _, rows = index.search_text(model, feats, 10)
        top[name] = rows
        out[f"{name}_t2v_R1"] = round(100 * float((rows[:, 0] == truth).float().mean()), 2)
        out[f"{name}_t2v_R10"] = round(100 * float((rows == truth[:, None]).any(1).float().mean()), 2)
        t0 = time.perf_counter()
        for t in texts[: args.timed]:
            encode_texts(model, [t], words)
        out[f"{name}_ms_per_query"] = round(1000 * (time.perf_counter() - t0) / min(args.timed, len(texts)), 2)
    shared = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top["fp32"], top["int8"])]
    out["int8_recall10_vs_fp32"] = round(sum(shared) / len(shared), 4)
    out["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
