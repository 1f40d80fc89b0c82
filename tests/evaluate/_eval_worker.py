"""One rank of the distributed evaluation test (launched by torchrun or mpiexec).

    worker.py EVAL_DIR TOKENIZER CACHE_DIR OUT_DIR

Writes OUT_DIR/rank<r>.json with every domain's NLL sum as float.hex (bit-exact).
"""

import json
import os
import sys

import torch

from megablocks_ablate.evaluate import EvalSuite, evaluate
from megablocks_ablate.model.config import ModelConfig
from megablocks_ablate.train.distributed import distributed_session

TINY = ["vocab_size=512", "max_seq_len=32", "init_std=0.1"]


def run(eval_dir, tokenizer, cache_dir):
    torch.manual_seed(0)
    model = ModelConfig.from_preset("tiny", TINY).build().eval()
    suite = EvalSuite.load(eval_dir, tokenizer, cache_dir=cache_dir)
    out = {}
    for name, stride in (("plain", None), ("sliding", 8)):
        res = evaluate(model, suite, stride=stride, batch_tokens=64)
        out[name] = {d: [r.nll_sum.hex(), r.tokens, r.bytes, r.documents] for d, r in res.items()}
    return out


if __name__ == "__main__":
    eval_dir, tokenizer, cache_dir, out_dir = sys.argv[1:5]
    with distributed_session(device="cpu", backend="gloo") as denv:
        result = run(eval_dir, tokenizer, cache_dir)
        with open(os.path.join(out_dir, f"rank{denv.rank}.json"), "w") as f:
            json.dump({"world": denv.world_size, "result": result}, f)
