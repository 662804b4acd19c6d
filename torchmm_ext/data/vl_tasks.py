"""Datasets and collators for the tasks ViLT and METER are fine-tuned on, from either ALBEF's
JSON files (and the shapes world, which writes them) or ViLT/METER's Arrow files.

* VQA as classification over an answer vocabulary (:class:`AnswerVocab`) with ViLT's soft
  scores (:func:`vqa_soft_score`: 0.3 per annotator who gave the answer, at most 1):
  :class:`ClassifierVQADataset`, :class:`ClassifierVQACollator`.
* NLVR2 image pairs: :class:`PairDataset`, :class:`PairCollator` (images ``[B, 2, 3, H, W]``).
* Retrieval with sampled negative texts (ViLT's IRTR: 15 per image):
  :class:`RetrievalNegativesDataset`, :class:`NegativesCollator`; evaluation images and texts:
  :class:`RetrievalEvalSet`.
* Pre-training (MLM + ITM): :class:`CaptionDataset`, :class:`MLMITMCollator` (BERT masking and
  half the images swapped for ITM negatives).

Every collator pads the batch's images to the largest one and returns the ``pixel_mask`` (1 on
real pixels), so images may keep their aspect ratio (ViLT's :func:`pixelbert_transform`); the
batch keys are the task models' ``forward`` arguments (``images``, ``pixel_mask``,
``input_ids``, ``attention_mask``, ``targets`` / ``labels``, ...), the same for single-stream
(ViLT) and dual-stream (METER) models. Errors name the file, record (or Arrow row) and field; a
bad image is a counted skip where ``skip_bad_samples`` is set.
"""

import json
import random
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from torchmm_ext.data.arrow import ArrowTables, CAPTION_COLUMNS, NLVR2_COLUMNS, VQA_COLUMNS
from torchmm_ext.data.captions import pre_caption
from torchmm_ext.data.datasets import (
    BadImageError,
    load_answer_list,
    load_image,
    load_json_list,
    SkippedSampleWarning,
)
from torchmm_ext.data.transforms import CLIP_MEAN, CLIP_STD
from torchmm_ext.modules.mlm import mask_tokens

__all__ = [
    "AnswerVocab",
    "CaptionDataset",
    "ClassifierVQACollator",
    "ClassifierVQADataset",
    "ImageSource",
    "MLMITMCollator",
    "NegativesCollator",
    "PairCollator",
    "PairDataset",
    "RetrievalEvalSet",
    "RetrievalNegativesDataset",
    "clip_transform",
    "image_transform",
    "is_arrow",
    "pad_images",
    "pixelbert_transform",
    "vqa_soft_score",
]

PathLike = Union[str, Path]
Transform = Callable[[Image.Image], Tensor]
_MAX_REPLACEMENT_TRIES = 20


def is_arrow(paths: Union[PathLike, Sequence[PathLike]]) -> bool:
    """Whether annotation files are Arrow files (by extension ``.arrow``); all must agree."""
    files = [paths] if isinstance(paths, (str, Path)) else list(paths)
    kinds = {str(p).endswith(".arrow") for p in files}
    if len(kinds) > 1:
        raise ValueError(f"mix of Arrow and JSON files: {', '.join(map(str, files))}; use one format per split")
    return kinds == {True}


# ---------------------------------------------------------------------- transforms


class _MinMaxResize:
    """Resize the shorter side to ``shorter`` unless the longer side would pass ``longer``
    (then the longer side to ``longer``), both sides rounded and floored to multiples of
    ``multiple`` (ViLT's ``MinMaxResize``; ViLT uses 32)."""

    def __init__(self, shorter: int, longer: int, multiple: int) -> None:
        self.shorter, self.longer, self.multiple = shorter, longer, multiple

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        scale = self.shorter / min(w, h)
        new_h, new_w = (self.shorter, scale * w) if h < w else (scale * h, self.shorter)
        if max(new_h, new_w) > self.longer:
            scale = self.longer / max(new_h, new_w)
            new_h, new_w = new_h * scale, new_w * scale
        new_h, new_w = int(new_h + 0.5), int(new_w + 0.5)
        new_h, new_w = max(new_h // self.multiple, 1) * self.multiple, max(new_w // self.multiple, 1) * self.multiple
        return image.resize((new_w, new_h), resample=Image.BICUBIC)


def pixelbert_transform(size: int = 384, train: bool = False, randaugment: bool = False,
                        multiple: int = 32, max_ratio: float = 1333 / 800) -> T.Compose:
    """ViLT's transform: keep the aspect ratio, shorter side ``size``, longer side at most
    ``int(max_ratio * size)`` (639 for 384), both multiples of ``multiple``; bicubic; mean and
    std 0.5. ``randaugment`` (training only) puts RandAugment(2, 9) first, as ViLT's
    ``_randaug`` variants do.

    Returns:
        torchvision.transforms.Compose: PIL image -> ``[3, H, W]``.
    """
    ops: List[Any] = [T.RandAugment(2, 9)] if (train and randaugment) else []
    ops += [_MinMaxResize(size, int(max_ratio * size), multiple), T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    return T.Compose(ops)


def clip_transform(size: int = 288, train: bool = False, randaugment: bool = False) -> T.Compose:
    """METER's CLIP transform: bicubic resize of the shorter side, centre crop ``size``, CLIP
    mean/std; ``randaugment`` (training only) puts RandAugment(2, 9) first.

    Returns:
        torchvision.transforms.Compose: PIL image -> ``[3, size, size]``.
    """
    ops: List[Any] = [T.RandAugment(2, 9)] if (train and randaugment) else []
    ops += [T.Resize(size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size),
            lambda image: image.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(ops)


def image_transform(kind: str, size: int, train: bool, randaugment: bool = False, multiple: int = 32) -> T.Compose:
    """The transform named ``kind`` (``"pixelbert"``: ViLT; ``"clip"``: METER)."""
    if kind == "pixelbert":
        return pixelbert_transform(size, train, randaugment, multiple)
    if kind == "clip":
        return clip_transform(size, train, randaugment)
    raise ValueError(f"unknown image transform {kind!r}; choose 'pixelbert' (ViLT) or 'clip' (METER)")


def pad_images(images: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Zero-pad ``[3, H_i, W_i]`` images to the largest height and width.

    Returns:
        Tuple[Tensor, Tensor]: ``images [N, 3, H, W]`` and ``pixel_mask [N, H, W]`` (long, 1 on
        real pixels).
    """
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    out = images[0].new_zeros(len(images), 3, height, width)
    mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = 1
    return out, mask


# ---------------------------------------------------------------------- image sources


class ImageSource:
    """Loads the images a dataset refers to, from files under ``image_root`` (JSON records) or
    from Arrow cells, and counts skipped bad samples.

    Args:
        transform (Transform): PIL image -> tensor.
        image_root (Optional[PathLike]): root of JSON records' image paths.
        tables (Optional[ArrowTables]): the Arrow rows of an Arrow dataset.
    """

    def __init__(self, transform: Transform, image_root: Optional[PathLike] = None,
                 tables: Optional[ArrowTables] = None) -> None:
        self.transform = transform
        self.image_root = Path(image_root) if image_root is not None else None
        self.tables = tables
        self.num_skipped = 0

    def load(self, ref: Any, where: Tuple[Path, int]) -> Tensor:
        """``ref``: an image path (JSON) or ``(row, column)`` (Arrow); ``where``: the record."""
        if isinstance(ref, tuple):
            return self.transform(self.tables.image(*ref))  # type: ignore[union-attr]
        return self.transform(load_image(self.image_root / ref, where[1], where[0]))  # type: ignore[operator]

    def skip(self, error: Exception) -> None:
        self.num_skipped += 1
        warnings.warn(f"skipped {self.num_skipped} bad samples so far; last: {error}", SkippedSampleWarning,
                      stacklevel=3)


class _TaskDataset(Dataset):
    """Shared ``__getitem__`` with replacement of bad samples (``skip_bad_samples``)."""

    images: ImageSource
    skip_bad_samples: bool = False

    def _get(self, index: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Any:
        try:
            return self._get(index)
        except (FileNotFoundError, BadImageError) as err:
            if not self.skip_bad_samples:
                raise
            self.images.skip(err)
        for _ in range(_MAX_REPLACEMENT_TRIES):
            other = random.randrange(len(self))  # type: ignore[arg-type]
            try:
                return self._get(other)
            except (FileNotFoundError, BadImageError) as err:
                self.images.skip(err)
        raise RuntimeError(f"{_MAX_REPLACEMENT_TRIES} replacement samples in a row were bad")

    @property
    def num_skipped(self) -> int:
        return self.images.num_skipped


# ---------------------------------------------------------------------- VQA


_VIT_SCORES = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}


def vqa_soft_score(count: int) -> float:
    """ViLT's VQA target score of an answer given by ``count`` of the (10) annotators:
    0, 0.3, 0.6, 0.9, then 1.0 from 4 annotators on (``write_vqa.get_score``)."""
    return _VIT_SCORES.get(count, 1.0)


class AnswerVocab:
    """The answers a VQA classifier predicts (index = logit).

    Args:
        answers (Sequence[str]): distinct answers in label order.
    """

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}
        if len(self.index) != len(self.answers):
            repeated = next(a for a, c in Counter(self.answers).items() if c > 1)
            raise ValueError(f"answer {repeated!r} repeats in the vocabulary")

    def __len__(self) -> int:
        return len(self.answers)

    @classmethod
    def from_answer_list(cls, path: PathLike) -> "AnswerVocab":
        """ALBEF's ``answer_list.json`` (a JSON list of answers)."""
        return cls(load_answer_list(path))

    @classmethod
    def from_arrow(cls, paths: Union[PathLike, Sequence[PathLike]]) -> "AnswerVocab":
        """The label set of ViLT/METER's VQAv2 Arrow files, rebuilt from their ``answers`` /
        ``answer_labels`` columns (as ViLT's datamodule does).

        Raises:
            ValueError: one label id names two answers, or ids leave gaps.
        """
        tables = ArrowTables(paths, ("answers", "answer_labels"))
        by_label: Dict[int, str] = {}
        for row, (answers, labels) in enumerate(zip(tables.column("answers"), tables.column("answer_labels"))):
            for q, (q_answers, q_labels) in enumerate(zip(answers or [], labels or [])):
                for answer, label in zip(q_answers, q_labels):
                    if by_label.setdefault(label, answer) != answer:
                        raise ValueError(f"{tables.where(row, 'answer_labels')}: question {q}: label {label} is "
                                         f"{answer!r} here but {by_label[label]!r} elsewhere")
        if not by_label:
            raise ValueError(f"{', '.join(map(str, tables.paths))}: no answer labels")
        size = max(by_label) + 1
        return cls([by_label.get(i, f"<unused label {i}>") for i in range(size)])

    def targets(self, scores: Mapping[str, float]) -> Dict[int, float]:
        """``{label: score}`` of the in-vocabulary answers of ``{answer: score}``."""
        return {self.index[a]: s for a, s in scores.items() if a in self.index}


class VQAQuestion(NamedTuple):
    """Attributes:
    image: image path (JSON) or ``(row, "image")`` (Arrow).
    question (str): the question.
    question_id (Any): the id the result JSON uses.
    scores (Dict[str, float]): soft score of each answer given (empty: no answers).
    answers (List[str]): the annotators' raw answers (JSON files; empty for Arrow files).
    where (Tuple[Path, int]): file and record (row) for messages.
    """

    image: Any
    question: str
    question_id: Any
    scores: Dict[str, float]
    answers: List[str]
    where: Tuple[Path, int]


def _vqa_json_questions(files: Sequence[Path], split: str) -> List[VQAQuestion]:
    keys = ("image", "question", "answer") if split == "train" else ("image", "question")
    out: List[VQAQuestion] = []
    for file in files:
        for i, rec in enumerate(load_json_list(file, keys)):
            if not isinstance(rec["question"], str):
                raise ValueError(f"{file}: record {i} key 'question' must be a string, got {rec['question']!r:.80}")
            raw = rec.get("answer", [])
            raw = [raw] if isinstance(raw, str) else raw
            if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
                raise ValueError(f"{file}: record {i} key 'answer' must be a string or a list of strings, "
                                 f"got {rec.get('answer')!r:.80}")
            scores = {a: vqa_soft_score(c) for a, c in Counter(raw).items()}
            qid = rec.get("question_id", f"{file.name}:{i}")
            out.append(VQAQuestion(rec["image"], rec["question"], qid, scores, list(raw), (file, i)))
    return out


def _vqa_arrow_questions(tables: ArrowTables, vocab: Optional[AnswerVocab]) -> List[VQAQuestion]:
    out: List[VQAQuestion] = []
    columns = {c: tables.column(c) for c in ("questions", "question_id", "answers", "answer_labels", "answer_scores")}
    for row in range(len(tables)):
        questions = columns["questions"][row]
        if not isinstance(questions, list) or not questions:
            raise ValueError(f"{tables.where(row, 'questions')}: expected a non-empty list of questions, got {questions!r:.80}")
        qids = columns["question_id"][row] or []
        answers = columns["answers"][row] or [[] for _ in questions]
        labels = columns["answer_labels"][row] or [[] for _ in questions]
        scores = columns["answer_scores"][row] or [[] for _ in questions]
        if not (len(qids) == len(questions) and len(answers) == len(labels) == len(scores) == len(questions)):
            raise ValueError(f"{tables.where(row, 'questions')}: {len(questions)} questions but {len(qids)} "
                             f"question ids, {len(answers)} answer lists, {len(labels)} label lists, "
                             f"{len(scores)} score lists")
        file_index, file_row = tables.locate(row)
        for q, question in enumerate(questions):
            if vocab is not None:
                bad = [label for label in labels[q] if not 0 <= label < len(vocab)]
                if bad:
                    raise ValueError(f"{tables.where(row, 'answer_labels')}: question {q} has label {bad[0]}, "
                                     f"outside the {len(vocab)}-answer vocabulary of the model")
            q_scores = {a: float(s) for a, s in zip(answers[q], scores[q])}
            out.append(VQAQuestion((row, "image"), question, qids[q], q_scores, [],
                                   (tables.paths[file_index], file_row)))
    return out


class ClassifierVQADataset(_TaskDataset):
    """VQA questions with soft answer targets, for a classifier over an :class:`AnswerVocab`.

    From ALBEF JSON files (``{"image", "question", "answer": [str] | str, "question_id"}``:
    annotator answers are counted and scored with :func:`vqa_soft_score`) or ViLT/METER VQAv2
    Arrow files (their own labels and scores; answers are matched to the vocabulary by string).
    In training, questions with no answer in the vocabulary are dropped, as ViLT's writer does
    (``num_dropped``).

    Args:
        files (Union[PathLike, Sequence[PathLike]]): ``.json`` or ``.arrow`` files.
        vocab (AnswerVocab): the answers the classifier predicts.
        transform (Transform): PIL image -> tensor.
        image_root (Optional[PathLike]): root of JSON image paths.
        split (str): ``"train"`` (answers required) or ``"test"``.
        max_words (int): question word limit (:func:`pre_caption`).
        skip_bad_samples (bool): replace bad images by random other samples (train only).

    Outputs (``__getitem__``):
        ``(image, question, targets: Dict[int, float], index)``; ``index`` into ``questions``.
    """

    def __init__(self, files: Union[PathLike, Sequence[PathLike]], vocab: AnswerVocab, transform: Transform,
                 image_root: Optional[PathLike] = None, split: str = "train", max_words: int = 40,
                 skip_bad_samples: bool = False) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
        tables = ArrowTables(paths, VQA_COLUMNS) if is_arrow(paths) else None
        self.images = ImageSource(transform, image_root, tables)
        self.skip_bad_samples = skip_bad_samples and split == "train"
        self.vocab, self.max_words, self.split = vocab, max_words, split
        questions = _vqa_arrow_questions(tables, vocab) if tables is not None else _vqa_json_questions(paths, split)
        if split == "train":
            kept = [q for q in questions if vocab.targets(q.scores)]
            self.num_dropped = len(questions) - len(kept)
            questions = kept
            if not questions:
                raise ValueError(f"{', '.join(map(str, paths))}: no question has an answer in the {len(vocab)}-answer vocabulary")
        else:
            self.num_dropped = 0
        self.questions: List[VQAQuestion] = questions

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def has_answers(self) -> bool:
        """Whether every question has answers (the split can be scored)."""
        return all(q.scores for q in self.questions)

    def _get(self, index: int) -> Tuple[Tensor, str, Dict[int, float], int]:
        q = self.questions[index]
        image = self.images.load(q.image, q.where)
        return image, pre_caption(q.question, self.max_words), self.vocab.targets(q.scores), index


class ClassifierVQACollator:
    """Batch :class:`ClassifierVQADataset` samples.

    Returns (``__call__``):
        Dict: ``images [B, 3, H, W]``, ``pixel_mask [B, H, W]``, ``input_ids`` /
        ``attention_mask [B, L]``, ``targets [B, A]`` (soft scores) and ``index [B]``.
    """

    def __init__(self, tokenizer: Any, num_answers: int, max_length: int = 40) -> None:
        self.tokenizer, self.num_answers, self.max_length = tokenizer, num_answers, max_length

    def __call__(self, batch: Sequence[Tuple[Any, ...]]) -> Dict[str, Tensor]:
        images, pixel_mask = pad_images([s[0] for s in batch])
        tokens = self.tokenizer([s[1] for s in batch], padding="longest", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        targets = torch.zeros(len(batch), self.num_answers)
        for i, sample in enumerate(batch):
            for label, score in sample[2].items():
                targets[i, label] = score
        return {"images": images, "pixel_mask": pixel_mask, "input_ids": tokens["input_ids"].long(),
                "attention_mask": tokens["attention_mask"].long(), "targets": targets,
                "index": torch.tensor([s[3] for s in batch], dtype=torch.long)}


# ---------------------------------------------------------------------- NLVR2


class PairExample(NamedTuple):
    images: Tuple[Any, Any]
    sentence: str
    label: int
    where: Tuple[Path, int]


def _label(value: Any, where: str) -> int:
    if value in ("True", True):
        return 1
    if value in ("False", False):
        return 0
    raise ValueError(f"{where}: label must be 'True' or 'False', got {value!r:.80}")


class PairDataset(_TaskDataset):
    """NLVR2 sentences about an image pair, from ALBEF JSON (``{"images": [a, b], "sentence",
    "label"}``) or NLVR2 Arrow files (``image_0``, ``image_1``, ``questions``, ``answers``).

    Args:
        files (Union[PathLike, Sequence[PathLike]]): ``.json`` or ``.arrow`` files.
        transform (Transform): PIL image -> tensor (each image on its own).
        image_root (Optional[PathLike]): root of JSON image paths.
        max_words (int): sentence word limit.
        skip_bad_samples (bool): replace bad images by random other samples.

    Raises:
        ValueError: a record without exactly two images, a bad label or sentence (the message
            names file, record and field); ArrowColumnError: a missing column.

    Outputs (``__getitem__``):
        ``(left image, right image, sentence, label)`` (True 1).
    """

    def __init__(self, files: Union[PathLike, Sequence[PathLike]], transform: Transform,
                 image_root: Optional[PathLike] = None, max_words: int = 40, skip_bad_samples: bool = False) -> None:
        paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
        tables = ArrowTables(paths, NLVR2_COLUMNS) if is_arrow(paths) else None
        self.images = ImageSource(transform, image_root, tables)
        self.skip_bad_samples, self.max_words = skip_bad_samples, max_words
        self.examples: List[PairExample] = []
        if tables is not None:
            questions, answers = tables.column("questions"), tables.column("answers")
            for row in range(len(tables)):
                if not isinstance(questions[row], list) or len(questions[row]) != len(answers[row] or []):
                    raise ValueError(f"{tables.where(row, 'answers')}: {len(answers[row] or [])} answers for "
                                     f"{len(questions[row] or [])} sentences")
                where = tables.locate(row)
                for sentence, answer in zip(questions[row], answers[row]):
                    self.examples.append(PairExample(((row, "image_0"), (row, "image_1")), sentence,
                                                     _label(answer, tables.where(row, "answers")),
                                                     (tables.paths[where[0]], where[1])))
        else:
            for file in paths:
                for i, rec in enumerate(load_json_list(file, ("images", "sentence", "label"))):
                    images = rec["images"]
                    if not (isinstance(images, list) and len(images) == 2 and all(isinstance(x, str) for x in images)):
                        raise ValueError(f"{file}: record {i} key 'images' must be a list of two image paths "
                                         f"(an NLVR2 pair), got {images!r:.80}")
                    if not isinstance(rec["sentence"], str):
                        raise ValueError(f"{file}: record {i} key 'sentence' must be a string")
                    self.examples.append(PairExample(tuple(images), rec["sentence"],  # type: ignore[arg-type]
                                                     _label(rec["label"], f"{file}: record {i} key 'label'"), (file, i)))

    def __len__(self) -> int:
        return len(self.examples)

    def _get(self, index: int) -> Tuple[Tensor, Tensor, str, int]:
        ex = self.examples[index]
        left, right = (self.images.load(ref, ex.where) for ref in ex.images)
        return left, right, pre_caption(ex.sentence, self.max_words), ex.label


class PairCollator:
    """Batch :class:`PairDataset` samples.

    Returns (``__call__``):
        Dict: ``images [B, 2, 3, H, W]``, ``pixel_mask [B, 2, H, W]`` (all 2B images padded to
        one size), ``input_ids`` / ``attention_mask [B, L]``, ``labels [B]``.
    """

    def __init__(self, tokenizer: Any, max_length: int = 40) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch: Sequence[Tuple[Any, ...]]) -> Dict[str, Tensor]:
        images, pixel_mask = pad_images([im for s in batch for im in s[:2]])
        b = len(batch)
        tokens = self.tokenizer([s[2] for s in batch], padding="longest", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        return {"images": images.view(b, 2, *images.shape[1:]), "pixel_mask": pixel_mask.view(b, 2, *pixel_mask.shape[1:]),
                "input_ids": tokens["input_ids"].long(), "attention_mask": tokens["attention_mask"].long(),
                "labels": torch.tensor([s[3] for s in batch], dtype=torch.long)}


# ---------------------------------------------------------------------- captions (retrieval, pre-training)


class _CaptionedImage(NamedTuple):
    image: Any
    captions: List[str]
    image_id: Any
    where: Tuple[Path, int]


def _captioned_images(paths: Sequence[Path], tables: Optional[ArrowTables]) -> List[_CaptionedImage]:
    """One entry per image (JSON records of the same ``image_id`` merged, in order)."""
    out: List[_CaptionedImage] = []
    if tables is not None:
        captions = tables.column("caption")
        for row in range(len(tables)):
            caps = captions[row]
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
                raise ValueError(f"{tables.where(row, 'caption')}: expected a non-empty list of captions, got {caps!r:.80}")
            file_index, file_row = tables.locate(row)
            out.append(_CaptionedImage((row, "image"), caps, row, (tables.paths[file_index], file_row)))
        return out
    by_id: Dict[Any, int] = {}
    for file in paths:
        for i, rec in enumerate(load_json_list(file, ("image", "caption"))):
            caps = [rec["caption"]] if isinstance(rec["caption"], str) else rec["caption"]
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
                raise ValueError(f"{file}: record {i} key 'caption' must be a string or a non-empty list of strings")
            key = rec.get("image_id", rec["image"])
            if key in by_id:
                out[by_id[key]].captions.extend(caps)
            else:
                by_id[key] = len(out)
                out.append(_CaptionedImage(rec["image"], list(caps), key, (file, i)))
    return out


def _open(files: Union[PathLike, Sequence[PathLike]]) -> Tuple[List[Path], Optional[ArrowTables]]:
    paths = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
    return paths, (ArrowTables(paths, CAPTION_COLUMNS) if is_arrow(paths) else None)


class CaptionDataset(_TaskDataset):
    """Images with their captions (one sample per image, a random caption each time), for
    pre-training; ALBEF JSON (``{"image", "caption": str | [str]}``) or caption Arrow files.

    Outputs (``__getitem__``): ``(image, caption)``.
    """

    def __init__(self, files: Union[PathLike, Sequence[PathLike]], transform: Transform,
                 image_root: Optional[PathLike] = None, max_words: int = 40, skip_bad_samples: bool = False) -> None:
        paths, tables = _open(files)
        self.images = ImageSource(transform, image_root, tables)
        self.skip_bad_samples, self.max_words = skip_bad_samples, max_words
        self.entries = _captioned_images(paths, tables)

    def __len__(self) -> int:
        return len(self.entries)

    def _get(self, index: int) -> Tuple[Tensor, str]:
        entry = self.entries[index]
        return self.images.load(entry.image, entry.where), pre_caption(random.choice(entry.captions), self.max_words)


class RetrievalNegativesDataset(_TaskDataset):
    """Retrieval training samples as ViLT's IRTR draws them: one sample per (image, caption),
    with ``num_negatives`` random captions of other images (ViLT: 15).

    Outputs (``__getitem__``): ``(image, [caption, negative_1, ..., negative_K])``.
    """

    def __init__(self, files: Union[PathLike, Sequence[PathLike]], transform: Transform,
                 image_root: Optional[PathLike] = None, num_negatives: int = 15, max_words: int = 40,
                 skip_bad_samples: bool = False) -> None:
        paths, tables = _open(files)
        self.images = ImageSource(transform, image_root, tables)
        self.skip_bad_samples, self.max_words, self.num_negatives = skip_bad_samples, max_words, num_negatives
        self.entries = _captioned_images(paths, tables)
        if len(self.entries) < 2:
            raise ValueError(f"{', '.join(map(str, paths))}: retrieval needs at least two images")
        self.pairs = [(e, c) for e in range(len(self.entries)) for c in range(len(self.entries[e].captions))]

    def __len__(self) -> int:
        return len(self.pairs)

    def _get(self, index: int) -> Tuple[Tensor, List[str]]:
        e, c = self.pairs[index]
        entry = self.entries[e]
        texts = [entry.captions[c]]
        while len(texts) <= self.num_negatives:
            other = random.randrange(len(self.entries))
            if other != e:
                texts.append(random.choice(self.entries[other].captions))
        return self.images.load(entry.image, entry.where), [pre_caption(t, self.max_words) for t in texts]


class NegativesCollator:
    """Batch :class:`RetrievalNegativesDataset` samples.

    Returns (``__call__``):
        Dict: ``images``, ``pixel_mask``, ``input_ids`` / ``attention_mask [B, 1 + K, L]``
        (the positive first).
    """

    def __init__(self, tokenizer: Any, max_length: int = 40) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, batch: Sequence[Tuple[Any, ...]]) -> Dict[str, Tensor]:
        images, pixel_mask = pad_images([s[0] for s in batch])
        b, t = len(batch), len(batch[0][1])
        tokens = self.tokenizer([text for s in batch for text in s[1]], padding="longest", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        return {"images": images, "pixel_mask": pixel_mask,
                "input_ids": tokens["input_ids"].long().view(b, t, -1),
                "attention_mask": tokens["attention_mask"].long().view(b, t, -1)}


class RetrievalEvalSet(_TaskDataset):
    """The images (items) and texts of a retrieval evaluation split, scored pair by pair.

    Attributes:
        text (List[str]): cleaned captions; txt2img (List[int]); img2txt (List[List[int]]).

    Outputs (``__getitem__``): ``(image, image_index)``; a bad image raises (it would change
    the metric) unless ``skip_bad_samples``, which blanks it (a counted skip; it scores as a miss).
    """

    def __init__(self, files: Union[PathLike, Sequence[PathLike]], transform: Transform,
                 image_root: Optional[PathLike] = None, max_words: int = 40, skip_bad_samples: bool = False) -> None:
        paths, tables = _open(files)
        self.images = ImageSource(transform, image_root, tables)
        self.skip_bad_samples = skip_bad_samples
        self.entries = _captioned_images(paths, tables)
        self.text: List[str] = []
        self.txt2img: List[int] = []
        self.img2txt: List[List[int]] = []
        for i, entry in enumerate(self.entries):
            self.img2txt.append(list(range(len(self.text), len(self.text) + len(entry.captions))))
            self.txt2img.extend([i] * len(entry.captions))
            self.text.extend(pre_caption(c, max_words) for c in entry.captions)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        entry = self.entries[index]
        try:
            return self.images.load(entry.image, entry.where), index
        except (FileNotFoundError, BadImageError) as err:
            if not self.skip_bad_samples:
                raise
            self.images.skip(err)
            return self.images.transform(Image.new("RGB", (64, 64), (128, 128, 128))), index


class ImagesCollator:
    """Batch ``(image, index)`` samples: ``images``, ``pixel_mask``, ``index``."""

    def __call__(self, batch: Sequence[Tuple[Tensor, int]]) -> Dict[str, Tensor]:
        images, pixel_mask = pad_images([s[0] for s in batch])
        return {"images": images, "pixel_mask": pixel_mask, "index": torch.tensor([s[1] for s in batch])}


def _single_token_id(tokenizer: Any, word: str) -> int:
    # Masking is per token: a word split into pieces could be completed from its other pieces.
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"data.mlm_focus_words: {word!r} is not one token of the vocabulary (tokens {pieces}); "
                         "focused masking takes single-token words")
    return int(ids[0])


class MLMITMCollator:
    """Batch :class:`CaptionDataset` samples for MLM + ITM pre-training.

    Texts are BERT-masked (15%, :func:`~torchmm_ext.modules.mlm.mask_tokens`); for ITM each
    sample's image is replaced, with probability 0.5, by another sample's image of the batch
    (ViLT draws a random false image from the dataset; within the batch is the same draw
    without the extra decoding).

    Args:
        tokenizer (Any): a Hugging Face tokenizer.
        max_length (int): text length after tokenisation.
        mlm_probability (float): chance that a token is chosen for MLM.
        mlm_focus_words (Sequence[str]): words chosen with ``mlm_focus_probability`` instead
            (focused masking, see :func:`~torchmm_ext.modules.mlm.mask_tokens`); each must be one
            token of the vocabulary. Empty (default): plain BERT masking.
        mlm_focus_probability (Optional[float]): chance that a focus word is chosen.

    Returns (``__call__``):
        Dict: ``images``, ``pixel_mask``, ``input_ids``, ``attention_mask``, ``mlm_input_ids``,
        ``mlm_labels``, ``itm_images``, ``itm_pixel_mask``, ``itm_labels`` (1 = own image).

    Raises:
        ValueError: a focus word that is not exactly one known token, or focus words without
            ``mlm_focus_probability``.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 40,
        mlm_probability: float = 0.15,
        mlm_focus_words: Sequence[str] = (),
        mlm_focus_probability: Optional[float] = None,
    ) -> None:
        self.tokenizer, self.max_length, self.mlm_probability = tokenizer, max_length, mlm_probability
        if mlm_focus_words and mlm_focus_probability is None:
            raise ValueError("data.mlm_focus_words is set but data.mlm_focus_probability is not")
        self.mlm_focus_probability = mlm_focus_probability
        self.mlm_focus_ids = [_single_token_id(tokenizer, w) for w in mlm_focus_words]

    def __call__(self, batch: Sequence[Tuple[Tensor, str]]) -> Dict[str, Tensor]:
        images, pixel_mask = pad_images([s[0] for s in batch])
        tokens = self.tokenizer([s[1] for s in batch], padding="longest", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        input_ids = tokens["input_ids"].long()
        tok = self.tokenizer
        masked = mask_tokens(input_ids, len(tok), tok.mask_token_id, tok.pad_token_id, tok.cls_token_id,
                             self.mlm_probability, focus_ids=self.mlm_focus_ids,
                             focus_probability=self.mlm_focus_probability)
        b = len(batch)
        swap = torch.rand(b) < 0.5 if b > 1 else torch.zeros(1, dtype=torch.bool)
        source = torch.arange(b)
        # a swapped sample takes the image of a different random sample
        offsets = torch.randint(1, max(b, 2), (b,))
        source = torch.where(swap, (source + offsets) % b, source)
        return {"images": images, "pixel_mask": pixel_mask, "input_ids": input_ids,
                "attention_mask": tokens["attention_mask"].long(), "mlm_input_ids": masked.input_ids,
                "mlm_labels": masked.labels, "itm_images": images[source], "itm_pixel_mask": pixel_mask[source],
                "itm_labels": (~swap).long()}
