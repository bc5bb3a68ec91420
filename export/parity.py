"""Measure how closely each exported ONNX variant agrees with the PyTorch encoder, and how fast it runs.

Parity: cosine between each variant's embedding and torch's, per sentence, over PARITY_TEXTS batched
with dynamic padding (batches mix lengths, so the attention mask and masked pooling are exercised).
Speed: sentences/s on CPU with pinned threads, variants measured in turns so that a busy shared machine
slows them all alike. The result is the `parity.json` record; `within_tolerance` (embedline/variants.py) judges one variant's entry.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from embedline import artifact as art
from embedline.export.sts import sts_spearman
from embedline.model_repository.common.ort_options import session_options
from embedline.tokenization import Batch, embed_by_length, encode, load_tokenizer
from embedline.variants import TOLERANCES, within_tolerance

# torch, onnxruntime and the torch encoder are imported inside the functions that measure: the benchmarks
# and the chaos harness import this module for its texts alone.

if TYPE_CHECKING:
    import onnxruntime as ort

    from embedline.encoder import SentenceEncoder
    from embedline.sts import StsPairs

log = logging.getLogger(__name__)

# Real, varied English: short and long, questions, punctuation, numbers, one empty string.
SHORT_TEXTS: tuple[str, ...] = (
    "A man is playing a guitar on the street corner.",
    "A woman is slicing tomatoes in the kitchen.",
    "The cat sat quietly on the windowsill, watching the rain.",
    "Two dogs are running through a field of tall grass.",
    "Hi!",
    "",
    "OK",
    "Where is the nearest train station?",
    "I lost my debit card yesterday; how do I block it?",
    "Why hasn't my transfer arrived yet??",
    "The stock market fell sharply after the central bank raised interest rates by half a percentage point.",
    'She said, "I\'ll be there at 5 p.m." -- but she never showed up.',
    "Honestly... I don't know what to think anymore.",
    "The movie was a complete waste of time: terrible acting, worse plot.",
    "What a wonderful, heart-warming film; I cried twice!",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The Treaty of Westphalia, signed in 1648, ended the Thirty Years' War.",
    "Python 3.11 is up to 25% faster than 3.10 on the pyperformance benchmark suite.",
    "Please reset my password -- the link in the e-mail has expired.",
    "How many calories are in a medium-sized banana?",
    "The children built a sandcastle, and the tide washed it away within minutes.",
    "Add two cups of flour, a pinch of salt, and stir until smooth.",
    "The server returned HTTP 503 (Service Unavailable) for about ten minutes.",
    "A quick brown fox jumps over the lazy dog.",
    "He plays the piano beautifully, although he never took a single lesson.",
    "Is it going to snow in Montreal this weekend?",
    "The committee will reconvene on Tuesday to review the revised budget proposal.",
    "Dr. Smith's lab at MIT published the results in Nature last March.",
    "I'd like to cancel my subscription, effective immediately.",
    "The bridge was closed for repairs, so traffic was diverted through the old town.",
    "Wow.",
    "New York City's population is roughly 8.3 million people.",
    "Can you recommend a good book about the history of mathematics?",
    "After the storm, volunteers cleared fallen trees and restored power to most homes within two days.",
    "My flight was delayed by three hours and I missed my connection in Frankfurt.",
    "The quarterly report shows revenue up 12% year over year, driven mainly by subscription growth in "
    "Europe and Asia.",
    "Glaciers in the Alps have lost more than half of their volume since 1900.",
    "Don't forget to water the plants while I'm away!",
    "Tokenizers split rare words like 'antidisestablishmentarianism' into several sub-word pieces.",
)
# ~320 word pieces: longer than max_seq_length (256 for all-MiniLM-L6-v2), so truncation is checked too.
LONG_TEXT = (
    "The history of the printing press begins long before Johannes Gutenberg. In China, woodblock printing "
    "was used to reproduce texts and images on cloth and later on paper as early as the seventh century, and "
    "the oldest dated printed book, a copy of the Diamond Sutra, was made in 868. Around 1040 the artisan Bi "
    "Sheng invented movable type made of baked clay, and in Korea metal movable type was used to print the "
    "Jikji in 1377, almost eighty years before Gutenberg's Bible. What Gutenberg contributed in Mainz around "
    "1450 was a complete system: a hand mould for casting uniform metal type quickly, an alloy of lead, tin "
    "and antimony that melted at a low temperature and cooled without shrinking, an oil-based ink that stuck "
    "to metal, and a screw press adapted from the presses used to make wine and olive oil. Together these "
    "made it possible to print hundreds of identical pages a day. Within fifty years presses were operating "
    "in more than two hundred European cities, and historians estimate that some twenty million books had "
    "been printed by 1500. Prices fell, literacy spread beyond monasteries and universities, and vernacular "
    "languages gained prestige as printers sold books to ordinary readers rather than to scholars alone. The "
    "press carried the pamphlets of the Reformation, the star charts of Copernicus and the anatomical "
    "drawings of Vesalius, and it allowed scientists to compare identical copies of the same tables and "
    "diagrams, which made errors easier to find and correct. Many historians therefore count it among the "
    "most important inventions of the second millennium, alongside the compass, gunpowder and the "
    "mechanical clock."
)
# The lengths static int8 finds hardest: one- and two-word texts (few tokens, [CLS]/[SEP] dominate the mean
# pooling) and a mid-length paragraph (~130 word pieces), beside LONG_TEXT.
EDGE_TEXTS: tuple[str, ...] = (
    "Thanks",
    "refund",
    "Yes.",
    "Good morning",
    "Seriously?",
    "I ordered a pair of running shoes three weeks ago and the tracking page still says the parcel is waiting "
    "at the regional depot. I have written to customer service twice, once through the contact form and once "
    "by e-mail, but nobody has answered. If the shoes cannot be delivered by Friday, please cancel the order "
    "and refund the full amount to the credit card I paid with, including the express shipping fee.",
)
PARITY_TEXTS: tuple[str, ...] = (*SHORT_TEXTS, *EDGE_TEXTS, LONG_TEXT)
PARITY_BATCH_SIZE = 8
# Speed is measured on typical short inputs (~16 word pieces), 128 sentences in batches of 32.
SPEED_SENTENCES = 128
SPEED_BATCH_SIZE = 32
STS_BATCH_SIZE = 64


def make_batches(tokenizer: Tokenizer, texts: list[str] | tuple[str, ...], batch_size: int) -> list[Batch]:
    """Consecutive batches, each padded to its own longest sequence."""
    return [encode(tokenizer, list(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of a (n, dim) with the same row of b (n, dim) -> (n,)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def ort_session(path: str | os.PathLike, threads: int,
                provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    """An ORT session with pinned threads (unpinned pools collapse on shared cores: docs/architecture.md,
    "Measured decisions", thread pinning)."""
    import onnxruntime as ort

    options = session_options(ort, threads, quiet=True)
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


# Each runner runs alone for turns of this long (at most; a quarter of the measurement when shorter), its
# first batch of a turn untimed, and the runners take turns. Switching engine every batch, as this check
# used to, measures each engine cold, which no server sees, and misranked them (benchmarks/README.md,
# "int8 calibration"). Turns still spread a shared machine's load changes over all runners alike.
SPEED_TURN_SECONDS = 0.25


def measure_throughput(runners: dict[str, Callable[[Batch], Any]], batches: list[Batch],
                       seconds: float) -> dict[str, float]:
    """Sentences/s of each runner, each running alone for turns of up to SPEED_TURN_SECONDS (cycling
    through `batches`), the runners taking turns until each has run at least `seconds`."""
    for run in runners.values():
        for batch in batches:  # warm-up on every shape: first-call allocations and per-shape kernel selection
            run(batch)
    seconds = max(seconds, 1e-9)  # at least one timed batch each
    turn_seconds = min(SPEED_TURN_SECONDS, seconds / 4)
    elapsed = dict.fromkeys(runners, 0.0)
    sentences = dict.fromkeys(runners, 0)
    position = dict.fromkeys(runners, 0)
    while pending := [name for name in runners if elapsed[name] < seconds]:
        for name in pending:
            run = runners[name]
            run(batches[position[name] % len(batches)])  # untimed: back into the caches after the others
            turn_started = time.perf_counter()
            while elapsed[name] < seconds:
                batch = batches[position[name] % len(batches)]
                position[name] += 1
                start = time.perf_counter()
                run(batch)
                elapsed[name] += time.perf_counter() - start
                sentences[name] += len(batch["input_ids"])
                if time.perf_counter() - turn_started >= turn_seconds:
                    break
    return {name: sentences[name] / elapsed[name] for name in runners}


def _torch_runner(encoder: SentenceEncoder) -> Callable[[Batch], np.ndarray]:
    import torch

    def run(batch: Batch) -> np.ndarray:
        with torch.no_grad():
            return encoder(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])).numpy()

    return run


def _session_runner(session: ort.InferenceSession) -> Callable[[Batch], np.ndarray]:
    def run(batch: Batch) -> np.ndarray:
        return session.run(["sentence_embedding"], batch)[0]

    return run


def _fp16_provider() -> str:
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider"
    return cuda if cuda in ort.get_available_providers() else "CPUExecutionProvider"


def _entry(variant: str, path: os.PathLike, provider: str, embeddings: np.ndarray,
           reference: np.ndarray) -> dict[str, Any]:
    """A parity.json entry: cosines of a variant's embeddings (texts, dim) to torch's."""
    cosines = row_cosines(embeddings, reference)
    entry = {
        "file": os.path.relpath(path, Path(path).parents[1]) if variant == "openvino" else Path(path).name,
        "provider": provider,
        "measured": True,
        "min_cosine": round(float(cosines.min()), 6),
        "mean_cosine": round(float(cosines.mean()), 6),
        "worst_text": PARITY_TEXTS[int(cosines.argmin())][:80],
    }
    log.info("%s on %s: cosine to torch min %.6f, mean %.6f", variant, provider,
             entry["min_cosine"], entry["mean_cosine"])
    return entry


def _measure_variant(artifact: art.Artifact, variant: str, threads: int, batches: list[Batch],
                     reference: np.ndarray) -> tuple[dict[str, Any], Callable[[Batch], Any] | None]:
    """(parity.json entry, runner for the speed test or None) of one variant against torch's embeddings."""
    if variant == "openvino":
        from embedline.export import openvino_int8  # openvino + nncf: an optional extra

        path = artifact.openvino_files()[0]
        run = openvino_int8.runner(path, threads)
        return _entry(variant, path, "OpenVINO CPU", np.concatenate([run(b) for b in batches]), reference), run
    path = artifact.onnx_path(variant)
    provider = _fp16_provider() if variant == "fp16" else "CPUExecutionProvider"
    try:
        session = ort_session(path, threads, provider)
        run = _session_runner(session)
        embeddings = np.concatenate([run(b) for b in batches])  # (texts, dim)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/NotImplemented types
        if variant != "fp16":
            raise
        # An ORT CPU build without kernels for this fp16 graph: the GPU test measures it instead.
        reason = f"needs CUDA (onnxruntime cannot run it on CPU: {str(exc).splitlines()[0]})"
        return {"file": path.name, "provider": provider, "measured": False, "reason": reason}, None
    # the provider that ran: ORT falls back to CPU silently
    entry = _entry(variant, path, session.get_providers()[0], embeddings, reference)
    if variant == "fp16" and entry["provider"] == "CPUExecutionProvider":
        entry["note"] = ("measured on CPU: ORT upcasts fp16 nodes without CPU kernels to fp32, so this checks "
                         "fp16 weights and storage, not GPU fp16 arithmetic")
    return entry, run


def measure(artifact: art.Artifact, variants: list[str], *, threads: int = 2,
            speed_seconds: float = 1.0, sts_pairs: StsPairs | None = None) -> dict[str, Any]:
    """The parity.json record of `variants` (already written under artifact.onnx_dir).

    speed_seconds: wall time spent timing each variant and torch (0: no speed measurement).
    sts_pairs: when given, each variant run on CPU (and torch) also gets its STS Spearman x100
    (`sts_spearman` in its entry); fp16 only where it runs on CUDA.
    """
    import onnxruntime as ort
    import torch

    from embedline.encoder import load_encoder

    tokenizer = load_tokenizer(artifact.tokenizer_path, artifact.max_seq_length)
    parity_batches = make_batches(tokenizer, PARITY_TEXTS, PARITY_BATCH_SIZE)
    speed_texts = [SHORT_TEXTS[i % len(SHORT_TEXTS)] for i in range(SPEED_SENTENCES)]
    speed_batches = make_batches(tokenizer, speed_texts, SPEED_BATCH_SIZE)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encoder = load_encoder(artifact)
        torch_run = _torch_runner(encoder)
        reference = np.concatenate([torch_run(b) for b in parity_batches])  # (texts, dim)

        entries: dict[str, dict[str, Any]] = {}
        cpu_runners: dict[str, Callable[[Batch], Any]] = {"torch": torch_run}
        for variant in variants:
            entries[variant], run = _measure_variant(artifact, variant, threads, parity_batches, reference)
            if run is not None and entries[variant]["provider"] in ("CPUExecutionProvider", "OpenVINO CPU"):
                cpu_runners[variant] = run

        speeds = measure_throughput(cpu_runners, speed_batches, speed_seconds) if speed_seconds > 0 else {}
        spearmans = {}
        if sts_pairs is not None:
            sts_runners = dict(cpu_runners)
            sts_runners.pop("fp16", None)  # on CPU fp16 is upcast to fp32: its STS says nothing new
            if entries.get("fp16", {}).get("provider") == "CUDAExecutionProvider":
                sts_runners["fp16"] = _session_runner(ort_session(artifact.onnx_path("fp16"), threads,
                                                                  "CUDAExecutionProvider"))
            spearmans = _sts_spearmans(tokenizer, artifact.dim, sts_runners, sts_pairs)
    finally:
        torch.set_num_threads(previous_threads)

    for variant, entry in entries.items():
        entry["sentences_per_second"] = round(speeds[variant], 1) if variant in speeds else None
        entry["tolerance"] = asdict(TOLERANCES[variant])
        entry["within_tolerance"] = within_tolerance(variant, entry)
        if sts_pairs is not None:
            entry["sts_spearman"] = spearmans.get(variant)
    sts = None
    if sts_pairs is not None:
        sts = {"file": sts_pairs.source, "pairs": len(sts_pairs.scores), "torch_spearman": spearmans.get("torch"),
               "metric": "Spearman x100 of cosine similarity vs gold score"}
    return {
        "texts": len(PARITY_TEXTS),
        "batch_size": PARITY_BATCH_SIZE,
        "reference": "torch (embedline.encoder.SentenceEncoder, fp32, CPU)",
        "speed": {
            "device": "cpu",
            "threads": threads,
            "sentences": SPEED_SENTENCES,
            "batch_size": SPEED_BATCH_SIZE,
            "torch_sentences_per_second": round(speeds["torch"], 1) if "torch" in speeds else None,
        },
        "onnxruntime": ort.__version__,
        "sts": sts,
        "variants": entries,
    }


def _sts_spearmans(tokenizer: Tokenizer, dim: int, runners: dict[str, Callable[[Batch], np.ndarray]],
                   pairs: StsPairs) -> dict[str, float]:
    """STS Spearman x100 of each runner; sentences sorted by length so batches carry little padding."""
    from tqdm.auto import tqdm


    def embedder(run: Callable[[Batch], np.ndarray]) -> Callable[[list[str]], np.ndarray]:
        return lambda sentences: embed_by_length(run, tokenizer, sentences, STS_BATCH_SIZE, dim)

    results = {}
    for name, run in tqdm(runners.items(), desc="STS Spearman", unit="variant", leave=False):
        results[name] = sts_spearman(embedder(run), pairs)
        log.info("%s: STS Spearman %.2f on %s", name, results[name], pairs.source)
    return results
