"""One run of the setfit library: train on a job's shots, predict its test texts (`benchmarks.setfit_library`).

Runs with the setfit virtual environment's Python (.bench/setfit-venv), by path:

    .bench/setfit-venv/bin/python benchmarks/setfit_worker.py JOB.json OUT.json

so it imports nothing of embedline or of this folder: only setfit and what setfit brings. JOB holds the
body directory, the training texts and labels, the test texts, the seed, the thread count and setfit's
TrainingArguments; OUT receives the predicted labels and the training time.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time


def main(job_path: str, out_path: str) -> None:
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    import torch
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    torch.set_num_threads(job["threads"])
    model = SetFitModel.from_pretrained(job["body"])
    train = Dataset.from_dict({"text": job["train_texts"], "label": job["train_labels"]})
    # setfit writes checkpoints to ./checkpoints by default: none are wanted, and none in the caller's folder.
    with tempfile.TemporaryDirectory(prefix="embedline-setfit-run-") as scratch:
        arguments = TrainingArguments(**job["arguments"], seed=job["seed"], output_dir=scratch, save_strategy="no",
                                      show_progress_bar=False, report_to="none")
        started = time.perf_counter()
        Trainer(model=model, args=arguments, train_dataset=train).train()
        train_seconds = time.perf_counter() - started
    predictions = model.predict(job["test_texts"], batch_size=64, as_numpy=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"predictions": [str(p) for p in predictions], "train_seconds": round(train_seconds, 1)}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
