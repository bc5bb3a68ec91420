"""Worked intent example: planning vs building vs done, with and without contrast pairs.

    .venv/bin/python examples/plan_vs_build/run.py [--seeds 5] [--iterations 3] [--work DIR]

1. trains `embedline train-classifier` on train.tsv from the bundled model, with and without
   `--pairs-file pairs.tsv`, once per seed;
2. measures held-out accuracy on test.tsv in-process (torch encoder + the artifact's head, as
   tests/test_serving_classify.py's `in_process` does) and prints mean ± sd of each arm;
3. serves the best artifact with `embedline serve`, classifies new utterances with the SDK (label, score
   and the labels of the nearest training examples), stops the server;
4. draws the space before (bundled model) and after (the best artifact) with `embedline plot-space`.

Results go to results.json and space.png next to this file; artifacts to --work (outside the checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
EMBEDLINE = str(BIN / "embedline")

NEW_UTTERANCES = [
    "We are thinking of moving the analytics jobs to Spark next year",
    "The analytics jobs are being moved to Spark this week",
    "We moved the analytics jobs to Spark back in October",
    "I'll set up the vendor contract review after the board meeting",
    "I'm reviewing the vendor contracts right now",
    "The vendor contracts were signed on Tuesday",
]


def read_tsv(path: Path) -> tuple[list[str], list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    t, l = header.index("text"), header.index("label")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return [r[t] for r in rows], [r[l] for r in rows]


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(avx512_vnni|amx_int8|avx2)\b", text)))


def train(output: Path, seed: int, iterations: int, threads: int, neighbours: int, pairs: Path | None,
          shots: int = 0) -> float:
    cmd = [EMBEDLINE, "train-classifier", "--train-file", str(HERE / "train.tsv"), "--output", str(output),
           "--seed", str(seed), "--iterations", str(iterations), "--neighbours", str(neighbours),
           "--threads", str(threads), "--shots", str(shots)]
    if pairs is not None:
        cmd += ["--pairs-file", str(pairs)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"train-classifier failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return time.perf_counter() - start


def evaluate(artifact_dir: Path, texts: list[str], labels: list[str]) -> dict:
    """Held-out accuracy in-process: the artifact's torch encoder, then its head."""
    from embedline import artifact as art
    from embedline.encoder import load_encoder
    from embedline.tokenization import load_tokenizer
    from embedline.training.evaluate import embed_texts
    from embedline.training.fewshot.head import load_head

    artifact = art.load_artifact(artifact_dir)
    tokenizer = load_tokenizer(artifact.tokenizer_path, artifact.max_seq_length)
    embeddings = embed_texts(load_encoder(artifact), tokenizer, texts).numpy()
    predicted = list(load_head(artifact.head_dir).predict(embeddings))
    correct = sum(p == y for p, y in zip(predicted, labels))
    per_class = {c: sum(p == y for p, y in zip(predicted, labels) if y == c) / labels.count(c)
                 for c in sorted(set(labels))}
    errors = [{"text": t, "label": y, "predicted": p} for t, y, p in zip(texts, labels, predicted) if p != y]
    return {"accuracy": correct / len(labels), "per_class": per_class, "errors": errors}


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def serve_and_classify(artifact_dir: Path, threads: int) -> list[dict]:
    from embedline.client import EmbeddingClient
    from embedline.serving.triton import free_port

    # Export only the fp32 graph (what --variant fp32 serves): much quicker than every variant on 2 cores.
    subprocess.run([EMBEDLINE, "export", "--model", str(artifact_dir), "--output", str(artifact_dir),
                    "--variants", "fp32", "--threads", str(threads), "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    grpc, http, metrics = free_port(), free_port(), free_port()
    cmd = [EMBEDLINE, "serve", "--artifact", str(artifact_dir), "--variant", "fp32", "--grpc-port", str(grpc),
           "--http-port", str(http), "--metrics-port", str(metrics), "--openai-port", "0", "--threads", str(threads)]
    print("$", " ".join(cmd[1:]).replace(str(artifact_dir), "<best artifact>"), flush=True)
    log = open(artifact_dir.parent / "serve.log", "w")
    server = subprocess.Popen([*cmd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"127.0.0.1:{grpc}"
    try:
        with EmbeddingClient(url, timeout=60) as client:
            deadline = time.monotonic() + 240
            while not client.health():
                if server.poll() is not None:
                    sys.exit(f"embedline serve exited ({server.returncode}); see {log.name}")
                if time.monotonic() > deadline:
                    sys.exit(f"server not ready after 240 s; see {log.name}")
                time.sleep(1)
            predictions = client.classify(NEW_UTTERANCES)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    rows = []
    for text, p in zip(NEW_UTTERANCES, predictions):
        neighbours = list(p.neighbour_labels or ())
        agree = sum(n == p.label for n in neighbours)
        rows.append({"text": text, "label": p.label, "score": round(float(p.score), 3),
                     "neighbour_labels": neighbours,
                     "neighbours_agreeing": f"{agree}/{len(neighbours)}"})
        print(f"  {p.label:9s} {p.score:.3f}  neighbours {','.join(neighbours)} ({agree}/{len(neighbours)} agree)  {text}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3, help="train-classifier --iterations (SetFit's R)")
    parser.add_argument("--neighbours", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=os.environ.get("EMBEDLINE_EXAMPLE_DIR", "/tmp/embedline-plan-vs-build"))
    parser.add_argument("--shots", type=int, default=0, help="examples per class (0: all 40); not 0 writes "
                        "results-shotsN.json and skips serving and the picture")
    parser.add_argument("--skip-serve", action="store_true")
    args = parser.parse_args()

    work = Path(args.work) / f"shots{args.shots}" if args.shots else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    test_texts, test_labels = read_tsv(HERE / "test.tsv")
    arms = {"without_pairs": None, "with_pairs": HERE / "pairs.tsv"}
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    best: tuple[float, Path] | None = None
    for seed in range(1, args.seeds + 1):
        for arm, pairs in arms.items():
            out = work / f"{arm}-seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            seconds = train(out, seed, args.iterations, args.threads, args.neighbours, pairs, args.shots)
            result = evaluate(out, test_texts, test_labels)
            result.update(seed=seed, train_seconds=round(seconds, 1))
            runs[arm].append(result)
            print(f"{arm:14s} seed {seed}: accuracy {result['accuracy']:.3f} "
                  f"({', '.join(f'{c} {a:.2f}' for c, a in result['per_class'].items())}; {seconds:.0f} s)", flush=True)
            if best is None or result["accuracy"] > best[0]:
                if best is not None:
                    shutil.rmtree(best[1], ignore_errors=True)
                best = (result["accuracy"], out)
            else:
                shutil.rmtree(out, ignore_errors=True)  # keep only the best artifact (each is ~90 MB)

    summary = {arm: dict(zip(("mean", "sd"), mean_sd([r["accuracy"] for r in rs]))) for arm, rs in runs.items()}
    (m0, s0), (m1, s1) = (tuple(summary[a].values()) for a in arms)
    print(f"accuracy without pairs: {m0:.3f} ± {s0:.3f}, with pairs: {m1:.3f} ± {s1:.3f} "
          f"({args.seeds} seeds, {len(test_labels)} held-out utterances)", flush=True)

    results = {
        "config": {"model": "bundled all-MiniLM-L6-v2 (train-classifier's default --model)",
                   "iterations": args.iterations, "seeds": list(range(1, args.seeds + 1)),
                   "neighbours": args.neighbours, "threads": args.threads, "shots": args.shots or "all (40 per class)",
                   "train": "train.tsv", "test": "test.tsv", "pairs": "pairs.tsv"},
        "host": {"cpu_flags": cpu_flags(), "cores": os.cpu_count(), "python": platform.python_version()},
        "summary": summary, "runs": runs,
        "best": {"arm_seed": best[1].name, "accuracy": best[0]},
    }
    if args.shots:
        (HERE / f"results-shots{args.shots}.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {HERE / f'results-shots{args.shots}.json'}")
        return 0
    if not args.skip_serve:
        results["served_predictions"] = serve_and_classify(best[1], args.threads)
    cmd = [EMBEDLINE, "plot-space", "--artifact", str(best[1]), "--data", str(HERE / "test.tsv"),
           "--output", str(HERE / "space.png"), "--threads", str(args.threads)]
    plot = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(plot.stdout[-1500:].strip())
    results["plot_space"] = plot.stdout.strip().splitlines()[-6:] if plot.returncode == 0 else f"failed ({plot.returncode})"
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {HERE / 'results.json'} and {HERE / 'space.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
