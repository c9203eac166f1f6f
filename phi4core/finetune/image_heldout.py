"""An eval stage's image-text held-out sets (`evaluate.heldout_images`), read as a vision
stage reads its training data, scored in vision mode for the base and the trained model.

Each source gives its first `max_samples` samples, in order, unshuffled:
  * `webdataset`: an energon dataset (`phi4 data pack-images`), one pass
    (phi4core.data.vision_loader.heldout_batches);
  * `chat_jsonl`: chat records with `images` (phi4core.data.multimodal's index format);
  * `synthetic` image: the demo's held-out images (phi4core.evaluation.stage.heldout_corpus,
    drawn with a seed no training corpus uses), also scored for caption accuracy and exact
    match as the demo's stages are.
The loss is token-weighted over every source's assistant tokens (heldout_loss), so it does not
depend on how the samples are batched.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from phi4core.config import DataSource
from phi4core.data.report import DataReport

log = logging.getLogger("phi4core.finetune")
BATCH = 8


def _batch_size(max_samples: int) -> int:
    """The largest batch up to BATCH that divides max_samples: whole batches make exactly
    max_samples (energon limits a dataset in batches)."""
    return next(b for b in range(min(BATCH, max_samples), 0, -1) if max_samples % b == 0)


class ImageHeldout:
    """The stage's image-text held-out sources, checked and (synthetic ones) written up front;
    `batches()` reads them again for each model."""

    def __init__(self, sources: list[DataSource], tokenizer, seq_length: int, vision,
                 max_samples: int, data_dir: Path) -> None:
        from phi4core.data.multimodal import MultimodalDataset
        from phi4core.data.vision_loader import check_dataset
        from phi4core.evaluation.stage import MEDIA_ITEMS, heldout_corpus

        if vision is None:
            raise ValueError("heldout_images: the model has no vision tower")
        self.tokenizer, self.seq_length, self.vision = tokenizer, seq_length, vision
        self.max_samples = max_samples
        self.parts: list = []  # an energon dataset's folder, or a MultimodalDataset
        self.data_dir = data_dir
        self.synthetic: list[int] = []  # sizes of the synthetic sets, for caption accuracy
        for s in sources:
            if s.kind == "webdataset":
                check_dataset(s.path)
                self.parts.append(s.path)
                continue
            if s.kind == "synthetic":
                items = s.samples or MEDIA_ITEMS
                index = heldout_corpus(data_dir, "image", seq_length, items, vision)
                self.synthetic.append(items)
            else:
                index = s.path
            self.parts.append(MultimodalDataset(index, tokenizer, seq_length, vision, "image",
                                                "skip"))
        self.reports: list[DataReport] = []

    def batches(self):
        """Every source's batches, in order (a fresh pass each call)."""
        from phi4core.data.multimodal import MultimodalCollator
        from phi4core.data.vision_loader import heldout_batches

        self.reports = []
        b = _batch_size(self.max_samples)
        for data in self.parts:
            if isinstance(data, str):
                report = DataReport(name=f"heldout webdataset {data}")
                self.reports.append(report)
                yield from heldout_batches(data, self.tokenizer, self.seq_length, b,
                                           vision=self.vision, limit=self.max_samples // b,
                                           report=report)
                continue
            collate = MultimodalCollator(self.seq_length, self.tokenizer.pad_id, self.vision)
            n = min(len(data), self.max_samples)
            for start in range(0, n, b):
                yield collate([data[i] for i in range(start, min(start + b, n))])

    def measure(self, model, which: str, device) -> list[dict]:
        """heldout_image_loss / _perplexity, and caption scores of the synthetic sources."""
        from phi4core.evaluation.language import heldout_loss
        from phi4core.evaluation.stage import media_accuracy

        h = heldout_loss(model, self.batches(), device)
        for report in self.reports:
            report.log_summary()
        out = [{"name": "heldout_image_loss", "value": h.loss if math.isfinite(h.loss) else None,
                "higher_is_better": False, "samples": h.samples, "model": which},
               {"name": "heldout_image_perplexity",
                "value": h.perplexity if math.isfinite(h.perplexity) else None,
                "higher_is_better": False, "samples": h.samples, "model": which}]
        for items in self.synthetic[:1]:  # the demo's caption questions: one set is enough
            out += [{**r.record(), "model": which} for r in media_accuracy(
                model, "image", self.data_dir, self.tokenizer, self.seq_length, self.vision,
                items, device)]
        return out
