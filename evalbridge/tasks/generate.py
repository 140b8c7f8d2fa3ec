"""Write the local tasks' data: held-out splits of the synthetic task family (never trained on) and small
training splits for few-shot examples. Deterministic; the JSONL files are committed.

    python -m evalbridge.tasks.generate
"""
import json
import os

from fastdllm_rt.train.synthetic import split

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SEED = 1
SIZES = {"arith": (200, 20), "mc_letter": (200, 20), "mc_text": (200, 20), "prose": (40, 0)}
KEEP = {"arith": ("question", "answer", "target"), "mc_letter": ("question", "choices", "gold", "prompt"),
        "mc_text": ("question", "choices", "gold", "prompt"), "prose": ("text",)}


def main():
    os.makedirs(HERE, exist_ok=True)
    for task, (n_test, n_train) in SIZES.items():
        for name, n, held in (("test", n_test, True), ("train", n_train, False)):
            if not n:
                continue
            rows = [{k: ex[k] for k in KEEP[task]} for ex in split(task, SEED, n, held_out=held)]
            with open(os.path.join(HERE, f"{task}_{name}.jsonl"), "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
