"""The OpenVINO variant: the fp32 ONNX graph read by OpenVINO and quantized to int8 with NNCF.

    model.onnx --openvino.read_model--> --nncf.quantize(TRANSFORMER, SmoothQuant 0.75)--> onnx/openvino/model.xml + .bin

On an AVX-512 VNNI host post-training int8 by NNCF is the fastest CPU route, within 0.1 STS-B Spearman of
fp32; on AVX2-only hosts it was slower than ONNX Runtime int8 (docs/architecture.md, "Measured decisions",
OpenVINO). The export's speed check on the exporting host
decides which serves (embedline/variants.py: choose_variant). NNCF is needed only here, at export; the server
needs only the `openvino` runtime. Both come with the `openvino` extra (pip install 'embedline[openvino]');
nothing else in embedline imports them.

Calibration (`calibration_texts`) covers the lengths real traffic has, whatever texts the user gives:
static int8 fixes each activation's range from the calibration samples, and ranges taken on sentences
alone do not hold for one- or two-word texts, where [CLS]/[SEP] dominate the mean pooling. Calibrated on
the first 300 STS-B dev sentences, all-MiniLM-L6-v2 reached cosine to torch 0.745 on "Wow."; on the
length-spread mix below, with SmoothQuant's alpha lowered from NNCF's 0.95 to 0.75, min 0.977-0.988 and
mean 0.996-0.997 over the parity texts, whichever shared STS file calibrated it (benchmarks/README.md,
"int8 calibration").
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from embedline.export.errors import ExportError
from embedline.tokenization import Batch

log = logging.getLogger(__name__)

# NNCF's guidance for transformers: a few hundred samples; more only slows the export.
CALIBRATION_SIZE = 300
# Shares of the calibration set by length: 1-3 word texts, and long texts (LONG_MIN_TOKENS up to
# max_seq_length tokens); the rest are the user's texts as they come (typically one sentence).
SHORT_SHARE = 0.2
LONG_SHARE = 0.2
LONG_MIN_TOKENS = 64
# SmoothQuant migrates activation outliers into the weights before quantizing MatMuls. NNCF's default for
# ModelType.TRANSFORMER is 0.95; measured on all-MiniLM-L6-v2 with the length-spread calibration, 0.75 gave
# the best short-text cosine (parity min 0.986-0.990 vs 0.979 at 0.95, 0.982 at 0.65, 0.959 at 0.5).
SMOOTH_QUANT_ALPHA = 0.75

# Built-in short texts for calibration: one to three words, as chat, search and support traffic has them.
# Disjoint from the parity texts (export/parity.py), so the parity check stays out of sample.
CALIBRATION_SHORT_TEXTS: tuple[str, ...] = (
    "Hello", "no", "Great.", "Help", "Why?", "Sure", "Oops", "Nice!", "hey you", "Bye.", "Really?", "good",
    "bad", "Never mind.", "Good night!", "What?", "Awesome", "Cancel", "Please", "Hmm", "Wait!", "No way!",
    "Me too.", "Got it", "Not sure", "I see.", "Congrats!", "Delivery", "lol", "Maybe later", "Of course!",
    "Invoice", "Pricing?", "weather today", "account locked",
)
# Used when the user gives no texts at all (no --calibration-file, no --sts-file): everyday sentences and a
# passage for the long end. Also disjoint from the parity texts.
CALIBRATION_SENTENCES: tuple[str, ...] = (
    "A little girl is climbing the stairs of a wooden slide.",
    "Two men are loading boxes into the back of a truck.",
    "The orchestra tuned their instruments before the concert began.",
    "Can I change the delivery address after the order has shipped?",
    "My card was charged twice for the same purchase.",
    "The new library opens at nine and closes at eight on weekdays.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "She finished the marathon in just under four hours.",
    "How do I export my contacts to a spreadsheet?",
    "The recipe calls for three eggs and a cup of sugar.",
    "A brown horse is grazing in a green meadow.",
    "The meeting has been moved to Thursday afternoon.",
    "What time does the pharmacy on Main Street close?",
    "Scientists discovered a new species of frog in the rainforest.",
    "The laptop battery drains quickly when the screen is at full brightness.",
    "I would like to upgrade my plan to the family subscription.",
    "The museum displays paintings from the Dutch Golden Age.",
    "A man in a red jacket is skiing down a steep slope.",
    "Is there a discount for students or seniors?",
    "The train was cancelled because of a signal failure near the station.",
    "Our team won the regional championship for the second year in a row.",
    "Please send me the invoice for last month's order.",
    "The volcano erupted, covering nearby villages in ash.",
    "He forgot his umbrella and got soaked on the way home.",
    "Which vaccines do I need before travelling to Kenya?",
    "The software update fixed the crash on startup.",
    "A group of tourists is taking photos in front of the cathedral.",
    "The price of coffee beans has risen sharply this year.",
    "Why does my phone keep disconnecting from the Wi-Fi?",
    "The novel tells the story of three sisters growing up in a small fishing town.",
)
CALIBRATION_PASSAGE = (
    "The lighthouse stood on a narrow spit of rock at the mouth of the harbour, and for more than a century "
    "its keepers lived in the small stone cottage beside it. Every evening at dusk the keeper climbed the "
    "spiral staircase, trimmed the wick, polished the great glass lens and wound the clockwork that turned "
    "it, so that the beam swept the water once every ten seconds. In winter storms the waves broke over the "
    "gallery and salt crusted the windows; the keeper would climb up again at midnight and at three in the "
    "morning to clean the glass and check that the light had not failed. Ships' captains learned to "
    "recognise each lighthouse by the rhythm of its flashes, and a light that went dark could mean a wreck "
    "on the reef before morning. Electricity arrived in the nineteen-twenties, and automatic lamps followed "
    "after the Second World War. One by one the keepers were withdrawn, the cottages were sold or let to "
    "holiday visitors, and the lights were watched from a control room many miles away. Today satellite "
    "navigation guides most vessels, yet the lighthouses still shine, partly as a back-up for when "
    "electronic systems fail and partly because coastal towns have come to see them as part of who they "
    "are. Volunteers repaint the towers, guide tourists up the stairs and tell the stories of the families "
    "who once kept the lamps burning through the longest nights of the year."
)


def require_openvino() -> None:
    """An ExportError naming the extra when openvino or nncf is missing."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"the OpenVINO variant needs openvino and nncf ({exc}); "
                          "pip install 'embedline[openvino]'") from exc


def _word_prefix(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def _token_prefix(tokenizer: Any, text: str, tokens: int) -> str:
    """The longest prefix of `text` that encodes to at most `tokens` tokens ([CLS] and [SEP] included)."""
    encoding = tokenizer.encode(text)
    content = [offset for offset, special in zip(encoding.offsets, encoding.special_tokens_mask) if not special]
    specials = len(encoding.ids) - len(content)
    keep = max(1, min(len(content), tokens - specials))
    return text[:content[keep - 1][1]].strip() if content else text


def _passages(texts: list[str], tokenizer: Any, max_tokens: int, count: int) -> list[str]:
    """Up to `count` passages of at least max_tokens tokens, each joining consecutive texts (cycling)."""
    passages: list[str] = []
    start = 0
    for _ in range(count):
        parts: list[str] = []
        for step in range(max_tokens):  # every text adds at least one token, so this always gets there
            parts.append(texts[(start + step) % len(texts)])
            if len(tokenizer.encode(" ".join(parts)).ids) >= max_tokens:
                break
        start = (start + len(parts)) % len(texts)
        passages.append(" ".join(parts))
    return passages


def calibration_texts(user_texts: Iterable[str], tokenizer: Any, max_tokens: int, *,
                      size: int = CALIBRATION_SIZE, seed: int = 0) -> tuple[list[str], dict[str, Any]]:
    """(texts, description): calibration texts spread over lengths, from the user's texts (may be empty).

    SHORT_SHARE of 1-3 word texts (half built-in, half word prefixes of the user's texts), LONG_SHARE of
    prefixes of passages joined from the user's texts, cut at token lengths spread geometrically from
    LONG_MIN_TOKENS (or max_tokens / 2 for short models) to max_tokens, and the rest the user's texts
    (a seeded sample, not the file's first lines, which are often one genre). Without user texts the
    built-in sentences and passage stand in.
    """
    rng = random.Random(seed)
    user = list(dict.fromkeys(t.strip() for t in user_texts if t and t.strip()))
    source = "given"
    if not user:
        user, source = [*CALIBRATION_SENTENCES, CALIBRATION_PASSAGE], "built-in"
    n_short = round(size * SHORT_SHARE)
    n_long = round(size * LONG_SHARE)
    n_middle = size - n_short - n_long

    n_builtin = min(len(CALIBRATION_SHORT_TEXTS), n_short // 2)
    short = rng.sample(CALIBRATION_SHORT_TEXTS, n_builtin)
    short += [_word_prefix(rng.choice(user), rng.choice((1, 1, 2, 3))) for _ in range(n_short - n_builtin)]

    low = min(LONG_MIN_TOKENS, max(4, max_tokens // 2))
    targets = [round(low * (max_tokens / low) ** (i / max(1, n_long - 1))) for i in range(n_long)]
    order = user[:]
    rng.shuffle(order)
    passages = _passages(order, tokenizer, max_tokens, n_long)
    long = [_token_prefix(tokenizer, passage, target) for passage, target in zip(passages, targets)]

    middle = rng.sample(user, n_middle) if len(user) > n_middle else user
    texts = [t for t in (*short, *middle, *long) if t]
    description = {
        "texts": len(texts),
        "source": source,
        "by_length": {"1-3 words": len(short), "as given": len(middle), f"{low}-{max_tokens} tokens": len(long)},
        "smooth_quant_alpha": SMOOTH_QUANT_ALPHA,
    }
    return texts, description


def quantize(fp32_onnx: Path, dest_xml: Path, calibration: list[Batch]) -> Path:
    """Write the NNCF int8 IR of the fp32 graph to dest_xml (+ .bin); calibration: one batch per sample."""
    require_openvino()
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    if not calibration:
        raise ExportError("the OpenVINO int8 quantization needs calibration texts")
    model = ov.Core().read_model(str(fp32_onnx))
    quantized = nncf.quantize(
        model,
        nncf.Dataset(calibration),
        model_type=nncf.ModelType.TRANSFORMER,  # keeps softmax / layer norm inputs in fp32
        subset_size=len(calibration),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=SMOOTH_QUANT_ALPHA)),
    )
    dest_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(dest_xml), compress_to_fp16=False)
    log.info("OpenVINO int8 IR %s (%d calibration samples)", dest_xml, len(calibration))
    return dest_xml


def runner(xml: Path, threads: int) -> Callable[[Batch], np.ndarray]:
    """A function batch -> embeddings (n, dim) on OpenVINO CPU with `threads` threads, one stream."""
    require_openvino()
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False,
    })
    request = compiled.create_infer_request()

    def run(batch: Batch) -> np.ndarray:
        request.infer(batch)
        return request.get_tensor("sentence_embedding").data.copy()

    return run
