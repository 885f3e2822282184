"""An ipywidgets inspector for predictions: browse, filter, diff, labels, attention, regenerate."""

from __future__ import annotations

import difflib
import html
import io

import ipywidgets as widgets
import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from medexgen_lib.config import EvalConfig
from medexgen_lib.labeler import OBSERVATIONS, POSITIVE
from medexgen_lib.metrics import per_sample_text_scores, prediction_labels
from medexgen_lib.visualize import AGREE, INVENTED, MISSED, attention_overlay, label_comparison

ALL = "(all observations)"
ORDERS = ("by index", "worst BLEU-4 first", "disagreements first")
NO_WORD = "(no overlay)"


def word_diff_html(reference: str, prediction: str) -> str:
    """Word-level diff: words only in the reference struck red, only in the prediction green."""
    ref, pred = reference.split(), prediction.split()
    parts = []
    for op, a1, a2, b1, b2 in difflib.SequenceMatcher(a=ref, b=pred, autojunk=False).get_opcodes():
        if op == "equal":
            parts.append(html.escape(" ".join(ref[a1:a2])))
            continue
        if a2 > a1:
            parts.append(f'<del style="color:{MISSED}">{html.escape(" ".join(ref[a1:a2]))}</del>')
        if b2 > b1:
            parts.append(f'<ins style="color:{AGREE}">{html.escape(" ".join(pred[b1:b2]))}</ins>')
    return " ".join(parts)


def _png(gray: np.ndarray, overlay: np.ndarray | None = None, scale: int = 3) -> bytes:
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32) / 255
    if overlay is not None:
        heat = colormaps["jet"](overlay)[..., :3]
        rgb = 0.6 * rgb + 0.4 * heat
    image = Image.fromarray((rgb * 255).astype(np.uint8))
    image = image.resize((gray.shape[1] * scale, gray.shape[0] * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class PredictionInspector:
    """Browse ``rows`` (from ``logs/predictions_<split>.json``) of the studies in ``data``.

    ``model`` (optional) enables the attention overlay and regeneration with
    other decoding settings. ``widget`` is the ipywidgets box to display.
    """

    def __init__(self, rows: list[dict], data, model=None, decode: EvalConfig | None = None):
        index_of = {e.uid: i for i, e in enumerate(data.examples)}
        self.rows = [dict(r) for r in rows if r["uid"] in index_of]
        if not self.rows:
            raise ValueError("no prediction belongs to a study of the given split")
        self.data, self.model, self.index_of = data, model, index_of
        self.decode = decode or EvalConfig(num_beams=1)
        present = [o for o in OBSERVATIONS if any(
            r["reference_labels"][o] == POSITIVE or r["prediction_labels"][o] == POSITIVE for r in self.rows)]
        style = {"description_width": "initial"}
        self.observation = widgets.Dropdown(options=[ALL, *present], description="Observation", style=style)
        self.only_disagreements = widgets.Checkbox(description="only disagreements", value=False)
        self.order = widgets.Dropdown(options=ORDERS, description="Order", style=style)
        self.position = widgets.IntSlider(min=0, max=0, description="Study", continuous_update=False)
        self.word = widgets.Dropdown(options=[NO_WORD], description="Attention for", style=style,
                                     disabled=model is None)
        self.beams = widgets.IntSlider(value=self.decode.num_beams, min=1, max=5, description="Beams",
                                       disabled=model is None)
        self.max_tokens = widgets.IntSlider(value=self.decode.max_new_tokens, min=10, max=200, step=10,
                                            description="Max tokens", disabled=model is None)
        self.regenerate = widgets.Button(description="Regenerate", icon="refresh", disabled=model is None)
        self.header = widgets.HTML()
        self.views = [widgets.Image(format="png") for _ in range(2)]
        self.text = widgets.HTML()
        self.labels = widgets.HTML()
        self.scores = widgets.HTML()
        for control in (self.observation, self.only_disagreements, self.order):
            control.observe(lambda _: self._refilter(), names="value")
        self.position.observe(lambda _: self._show(), names="value")
        self.word.observe(lambda _: self._draw_views(), names="value")
        self.regenerate.on_click(lambda _: self.regenerate_current())
        self.widget = widgets.VBox([
            widgets.HBox([self.observation, self.only_disagreements, self.order]),
            self.position, self.header, widgets.HBox(self.views), self.text,
            widgets.HBox([self.labels, self.scores]),
            widgets.HBox([self.word, self.beams, self.max_tokens, self.regenerate]),
        ])
        self.visible: list[int] = []
        self._refilter()

    # ------------------------------------------------------------------ selection

    def _disagrees(self, row: dict, observation: str | None) -> bool:
        verdicts = label_comparison(row["reference_labels"], row["prediction_labels"])
        if observation:
            return verdicts.get(observation, "agree") != "agree"
        return any(v != "agree" for v in verdicts.values())

    def _refilter(self) -> None:
        obs = None if self.observation.value == ALL else self.observation.value
        keep = [i for i, r in enumerate(self.rows)
                if (obs is None or r["reference_labels"][obs] == POSITIVE or r["prediction_labels"][obs] == POSITIVE)
                and (not self.only_disagreements.value or self._disagrees(r, obs))]
        if self.order.value == "worst BLEU-4 first":
            keep.sort(key=lambda i: self.rows[i]["BLEU-4"])
        elif self.order.value == "disagreements first":
            keep.sort(key=lambda i: not self._disagrees(self.rows[i], obs))
        self.visible = keep
        self.position.max = max(0, len(keep) - 1)
        self.position.value = 0
        self._show()

    @property
    def current(self) -> dict | None:
        return self.rows[self.visible[self.position.value]] if self.visible else None

    # ------------------------------------------------------------------ display

    def _show(self) -> None:
        row = self.current
        if row is None:
            self.header.value = "<b>No study matches the filter.</b>"
            self.text.value = self.labels.value = self.scores.value = ""
            return
        self.header.value = (f"<b>{html.escape(row['uid'])}</b> ({self.position.value + 1} of "
                             f"{len(self.visible)} shown, {len(self.rows)} in all)"
                             + (" <i>regenerated</i>" if row.get("regenerated") else ""))
        self.text.value = (f"<p><b>Reference:</b> {html.escape(row['reference'])}</p>"
                           f"<p><b>Prediction:</b> {html.escape(row['prediction'])}</p>"
                           f"<p><b>Diff</b> (<del>reference only</del>, <ins>prediction only</ins>): "
                           f"{word_diff_html(row['reference'], row['prediction'])}</p>")
        self.labels.value = self._labels_html(row)
        self.scores.value = (f"<table><tr><td>BLEU-4</td><td>{row['BLEU-4']:.3f}</td></tr>"
                             f"<tr><td>ROUGE-L</td><td>{row['ROUGE-L']:.3f}</td></tr></table>")
        words = sorted({w.strip(".,;:").lower() for w in row["prediction"].split()} - {""})
        self.word.options = [NO_WORD, *words]
        self.word.value = NO_WORD
        self._draw_views()

    def _labels_html(self, row: dict) -> str:
        colours = {"agree": AGREE, "missed": MISSED, "invented": INVENTED}
        verdicts = label_comparison(row["reference_labels"], row["prediction_labels"])
        lines = ["<table><tr><th>observation</th><th>reference</th><th>prediction</th></tr>"]
        for obs in OBSERVATIONS:
            ref, pred = row["reference_labels"][obs], row["prediction_labels"][obs]
            if ref == "absent" and pred == "absent":
                continue
            colour = colours.get(verdicts.get(obs, ""), "inherit")
            lines.append(f'<tr style="color:{colour}"><td>{obs}</td><td>{ref}</td><td>{pred}</td></tr>')
        return "".join(lines) + "</table>"

    def _draw_views(self) -> None:
        row = self.current
        if row is None:
            return
        index = self.index_of[row["uid"]]
        pixels = self.data.pixels(index)
        overlay = None
        if self.model is not None and self.word.value not in (None, NO_WORD):
            token_ids = self.model.tokenizer.encode(row["prediction"], add_special_tokens=False)
            mask = torch.tensor([i is not None for i in self.data.examples[index].image_ids])
            overlay = attention_overlay(self.model, pixels, mask, token_ids, self.word.value)
        for v, view in enumerate(self.views):
            view.value = _png(pixels[v].numpy(), None if overlay is None else overlay[v])

    # ------------------------------------------------------------------ regenerate

    def regenerate_current(self) -> str:
        """Generate the shown study again with the widget's beam size and max tokens."""
        from medexgen_lib.reporting import generate_reports
        from medexgen_lib.visualize import _subset

        row = self.current
        if row is None or self.model is None:
            return ""
        decode = EvalConfig(num_beams=self.beams.value, max_new_tokens=self.max_tokens.value,
                            batch_size=1, meteor=False)
        subset = _subset(self.data, [self.index_of[row["uid"]]])
        written = generate_reports(self.model, subset, decode, progress=False)[0]
        prediction = written["prediction"]
        row.update(prediction=prediction, decoder_text=written["decoder_text"], regenerated=True,
                   prediction_labels=prediction_labels(prediction, written["decoder_text"]),
                   **per_sample_text_scores(row["reference"], prediction))
        self._show()
        return prediction
