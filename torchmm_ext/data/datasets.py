"""Datasets for ALBEF's JSON annotation formats, with errors that name file, record and key.

Annotation files are JSON lists of records (see ``REFERENCE.md``). Image paths in records are
relative to an ``image_root``. Bad annotations always raise; bad images (missing, corrupt)
raise too unless ``skip_bad_samples=True``, in which case the sample is replaced and counted.
"""

import json
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from torchmm_ext.data.captions import pre_caption

__all__ = [
    "BadImageError",
    "SkippedSampleWarning",
    "load_json_list",
    "load_image",
    "RetrievalTrainDataset",
    "RetrievalEvalDataset",
    "PretrainDataset",
    "RetrievalCollator",
    "VQADataset",
    "VQACollator",
    "load_answer_list",
    "VEDataset",
    "VE_LABELS",
    "NLVRDataset",
    "NLVRCollator",
    "GroundingDataset",
]

PathLike = Union[str, Path]
Transform = Callable[[Image.Image], Tensor]

# How many replacement samples to try before giving up when skipping bad images.
_MAX_REPLACEMENT_TRIES = 20


class BadImageError(OSError):
    """An image file exists but cannot be decoded."""


class SkippedSampleWarning(UserWarning):
    """A bad sample was replaced because ``skip_bad_samples=True``."""


def load_json_list(path: PathLike, required_keys: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """Read a JSON list of records and check that each record has ``required_keys``.

    Args:
        path (PathLike): annotation file.
        required_keys (Sequence[str]): keys every record must have.

    Returns:
        List[Dict[str, Any]]: the records.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, top level not a list, empty list, or a record that is not an
            object or lacks a key; the message names the file (and record index and key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: empty split (no records)")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {i} is a {type(record).__name__}, expected an object with keys {list(required_keys)}")
        for key in required_keys:
            if key not in record:
                raise ValueError(f"{path}: record {i} has no {key!r} key (keys: {', '.join(record)})")
    return data


def _check_text(value: Any, path: Path, index: int, key: str, allow_list: bool = True) -> List[str]:
    """Return the record's text(s) as a list, or raise naming file, record and key."""
    if isinstance(value, str):
        return [value]
    if allow_list and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    expected = "a string or a non-empty list of strings" if allow_list else "a string"
    raise ValueError(f"{path}: record {index} key {key!r} must be {expected}, got {type(value).__name__}: {value!r:.80}")


def load_image(path: PathLike, record_index: int, ann_file: PathLike) -> Image.Image:
    """Open an image as RGB, with errors that say which annotation record asked for it.

    Args:
        path (PathLike): image file.
        record_index (int): index of the record in ``ann_file`` (for the message).
        ann_file (PathLike): annotation file the record comes from (for the message).

    Returns:
        PIL.Image.Image: the decoded RGB image.

    Raises:
        FileNotFoundError: the image does not exist.
        BadImageError: the image cannot be decoded.
    """
    where = f"(record {record_index} of {ann_file})"
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode inside the try
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image not found: {path} {where}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot read image {path} {where}: {type(e).__name__}: {e}") from e


class _ImageAnnotationDataset(Dataset):
    """Shared image loading with optional skipping of bad samples.

    ``num_skipped`` counts replaced samples. With ``num_workers > 0`` each worker process has
    its own copy of the dataset, so the counter (and its warnings) is per worker.
    """

    def __init__(self, image_root: PathLike, transform: Transform, skip_bad_samples: bool) -> None:
        self.image_root = Path(image_root)
        self.transform = transform
        self.skip_bad_samples = skip_bad_samples
        self.num_skipped = 0
        # sample_source[i] = (annotation file, record index) for error messages
        self.sample_source: List[Tuple[Path, int]] = []

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int, image: str) -> Tensor:
        ann_file, record = self.sample_source[index]
        return self.transform(load_image(self.image_root / image, record, ann_file))

    def _report_skip(self, index: int, image: str, error: Exception) -> None:
        self.num_skipped += 1
        ann_file, record = self.sample_source[index]
        cause = error.__cause__
        if isinstance(error, FileNotFoundError):
            reason = "file not found"
        else:
            reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
        msg = (
            f"skipped {self.num_skipped} bad samples so far; last: {self.image_root / image} "
            f"(record {record} of {ann_file}): {reason}"
        )
        # One warning per skip (the running count makes each message distinct, so Python's
        # once-per-location filter does not swallow them).
        warnings.warn(msg, SkippedSampleWarning, stacklevel=2)

    def _get_with_replacement(self, index: int, get: Callable[[int], Any], image_of: Callable[[int], str]) -> Any:
        """``get(index)``; on a bad image and ``skip_bad_samples``, ``get`` of random other indices."""
        try:
            return get(index)
        except (FileNotFoundError, BadImageError) as e:
            if not self.skip_bad_samples:
                raise
            self._report_skip(index, image_of(index), e)
        for _ in range(_MAX_REPLACEMENT_TRIES):
            other = random.randrange(len(self))
            try:
                return get(other)
            except (FileNotFoundError, BadImageError) as e:
                self._report_skip(other, image_of(other), e)
        raise RuntimeError(f"{_MAX_REPLACEMENT_TRIES} replacement samples in a row were bad; check image_root {self.image_root}")


class RetrievalTrainDataset(_ImageAnnotationDataset):
    """Image-caption pairs for ITC/ITM fine-tuning (ALBEF ``re_train_dataset``).

    Records: ``{"image": str, "caption": str | [str], "image_id": str | int}``; a list caption
    gives one sample per caption. Distinct ``image_id`` values map to consecutive ints in order
    of first appearance across ``ann_files``: the ``idx`` that marks positives in the ITC targets.

    Args:
        ann_files (Sequence[PathLike]): annotation files, concatenated.
        image_root (PathLike): directory the records' image paths are relative to.
        transform (Callable): PIL image -> tensor.
        max_words (int): caption word limit for :func:`pre_caption`. Default: 30.
        skip_bad_samples (bool): replace a missing/corrupt image by a random other sample
            (counted in ``num_skipped``, warned) instead of raising. Default: ``False``.

    Outputs (``__getitem__``):
        Tuple[Tensor, str, int]: transformed image, cleaned caption, image index.
    """

    def __init__(
        self,
        ann_files: Sequence[PathLike],
        image_root: PathLike,
        transform: Transform,
        max_words: int = 30,
        skip_bad_samples: bool = False,
    ) -> None:
        super().__init__(image_root, transform, skip_bad_samples)
        if isinstance(ann_files, (str, Path)):
            ann_files = [ann_files]
        self.max_words = max_words
        self.samples: List[Tuple[str, str, int]] = []  # (image, caption, idx)
        self.img_ids: Dict[Any, int] = {}
        for ann_file in ann_files:
            ann_file = Path(ann_file)
            for i, rec in enumerate(load_json_list(ann_file, ("image", "caption", "image_id"))):
                captions = _check_text(rec["caption"], ann_file, i, "caption")
                idx = self.img_ids.setdefault(rec["image_id"], len(self.img_ids))
                for caption in captions:
                    self.samples.append((rec["image"], caption, idx))
                    self.sample_source.append((ann_file, i))

    @property
    def num_images(self) -> int:
        """Number of distinct ``image_id`` values."""
        return len(self.img_ids)

    def __len__(self) -> int:
        return len(self.samples)

    def caption_lengths(self) -> List[int]:
        """Words per cleaned caption, sample by sample (for length-grouped batching)."""
        return [len(pre_caption(caption, self.max_words).split()) for _, caption, _ in self.samples]

    def _get(self, index: int) -> Tuple[Tensor, str, int]:
        image, caption, idx = self.samples[index]
        return self._load(index, image), pre_caption(caption, self.max_words), idx

    def __getitem__(self, index: int) -> Tuple[Tensor, str, int]:
        return self._get_with_replacement(index, self._get, lambda i: self.samples[i][0])


class RetrievalEvalDataset(_ImageAnnotationDataset):
    """Images of a retrieval val/test split plus all their captions (ALBEF ``re_eval_dataset``).

    Records: ``{"image": str, "caption": [str]}``. Texts are flattened in record order.

    Args:
        ann_file (PathLike): annotation file.
        image_root (PathLike): directory the image paths are relative to.
        transform (Callable): PIL image -> tensor.
        max_words (int): caption word limit. Default: 30.
        skip_bad_samples (bool): a missing/corrupt image is replaced by a grey image (so it
            still occupies its slot and simply scores as a miss), counted and warned, instead
            of raising. Default: ``False``.

    Attributes:
        text (List[str]): cleaned captions. image (List[str]): image paths per record.
        txt2img (List[int]): image index of each text. img2txt (List[List[int]]): text
        indices of each image.

    Outputs (``__getitem__``):
        Tuple[Tensor, int]: transformed image and its index.
    """

    def __init__(
        self,
        ann_file: PathLike,
        image_root: PathLike,
        transform: Transform,
        max_words: int = 30,
        skip_bad_samples: bool = False,
    ) -> None:
        super().__init__(image_root, transform, skip_bad_samples)
        ann_file = Path(ann_file)
        self.text: List[str] = []
        self.image: List[str] = []
        self.txt2img: List[int] = []
        self.img2txt: List[List[int]] = []
        for i, rec in enumerate(load_json_list(ann_file, ("image", "caption"))):
            captions = _check_text(rec["caption"], ann_file, i, "caption")
            self.image.append(rec["image"])
            self.sample_source.append((ann_file, i))
            self.img2txt.append([])
            for caption in captions:
                self.img2txt[i].append(len(self.text))
                self.txt2img.append(i)
                self.text.append(pre_caption(caption, max_words))

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        try:
            return self._load(index, self.image[index]), index
        except (FileNotFoundError, BadImageError) as e:
            if not self.skip_bad_samples:
                raise
            self._report_skip(index, self.image[index], e)
            # Substituting another image would corrupt the metrics: keep the slot, blank it.
            return self.transform(Image.new("RGB", (32, 32), (128, 128, 128))), index


class RetrievalPairs(Dataset):
    """An evaluation split's (image, caption) pairs as training samples (the
    :class:`RetrievalTrainDataset` format, the image index as ``idx``): held-out batches for
    methods that score the training loss during training (the DAS search).

    Args:
        split (RetrievalEvalDataset): the evaluation split.

    Outputs (``__getitem__``):
        Tuple[Tensor, str, int]: image, caption, image index (one sample per caption).
    """

    def __init__(self, split: "RetrievalEvalDataset") -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.text)

    def __getitem__(self, index: int) -> Tuple[Tensor, str, int]:
        image_index = self.split.txt2img[index]
        return self.split[image_index][0], self.split.text[index], image_index


class PretrainDataset(_ImageAnnotationDataset):
    """Image-caption pairs for pre-training (ALBEF ``pretrain_dataset``).

    Records: ``{"image": str, "caption": str | [str]}``; for a list one caption is drawn at
    random on every access.

    Args:
        ann_files (Sequence[PathLike]): annotation files, concatenated.
        image_root (PathLike): directory the image paths are relative to.
        transform (Callable): PIL image -> tensor.
        max_words (int): caption word limit. Default: 30.
        skip_bad_samples (bool): replace missing/corrupt images by random other samples
            (counted, warned). Default: ``False``.

    Outputs (``__getitem__``):
        Tuple[Tensor, str]: transformed image and cleaned caption.
    """

    def __init__(
        self,
        ann_files: Sequence[PathLike],
        image_root: PathLike,
        transform: Transform,
        max_words: int = 30,
        skip_bad_samples: bool = False,
    ) -> None:
        super().__init__(image_root, transform, skip_bad_samples)
        if isinstance(ann_files, (str, Path)):
            ann_files = [ann_files]
        self.max_words = max_words
        self.samples: List[Tuple[str, List[str]]] = []
        for ann_file in ann_files:
            ann_file = Path(ann_file)
            for i, rec in enumerate(load_json_list(ann_file, ("image", "caption"))):
                self.samples.append((rec["image"], _check_text(rec["caption"], ann_file, i, "caption")))
                self.sample_source.append((ann_file, i))

    def __len__(self) -> int:
        return len(self.samples)

    def _get(self, index: int) -> Tuple[Tensor, str]:
        image, captions = self.samples[index]
        # `random` is reseeded per worker by the DataLoader, so this is reproducible there.
        caption = captions[0] if len(captions) == 1 else random.choice(captions)
        return self._load(index, image), pre_caption(caption, self.max_words)

    def __getitem__(self, index: int) -> Tuple[Tensor, str]:
        return self._get_with_replacement(index, self._get, lambda i: self.samples[i][0])


class RetrievalCollator:
    """Batch ``(image, caption, idx)`` or ``(image, caption)`` samples and tokenise captions.

    Picklable (a plain class holding the tokenizer), so it works with worker processes.

    Args:
        tokenizer: a Hugging Face tokenizer (callable on a list of strings).
        max_length (int): token limit including [CLS] and [SEP]. Default: 30.

    Returns (``__call__``):
        Dict[str, Tensor]: ``image`` [B, 3, H, W] float, ``input_ids`` and ``attention_mask``
        [B, L] long (padded to the longest caption of the batch), and ``idx`` [B] long when
        the samples carry one.
    """

    def __init__(self, tokenizer: Any, max_length: int = 30) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch: Sequence[Tuple[Any, ...]]) -> Dict[str, Tensor]:
        if not batch:
            raise ValueError("RetrievalCollator got an empty batch")
        images = torch.stack([sample[0] for sample in batch])
        tokens = self.tokenizer(
            [sample[1] for sample in batch],
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        out = {
            "image": images,
            "input_ids": tokens["input_ids"].long(),
            "attention_mask": tokens["attention_mask"].long(),
        }
        if len(batch[0]) > 2:
            out["idx"] = torch.tensor([int(sample[2]) for sample in batch], dtype=torch.long)
        return out


# ---------------------------------------------------------------------- other ALBEF tasks


def _as_files(ann_files: Union[PathLike, Sequence[PathLike]]) -> List[Path]:
    return [Path(ann_files)] if isinstance(ann_files, (str, Path)) else [Path(f) for f in ann_files]


class VQADataset(_ImageAnnotationDataset):
    """VQA questions (ALBEF ``vqa_dataset``).

    Records: ``{"image", "question", "answer": str | [str], "dataset": "vqa" | "vg"}``, test
    records add ``"question_id"`` (unique within the split) and may lack ``"answer"``. In
    ``"train"`` mode every distinct answer gets the weight ``count / num_answers`` (Visual
    Genome answers 0.5) and ``eos`` is appended to it, as the answer decoder predicts an end
    token.

    Args:
        ann_files (Sequence[PathLike]): annotation files, concatenated.
        image_root (PathLike): directory the image paths are relative to.
        transform (Callable): PIL image -> tensor.
        split (str): ``"train"`` or ``"test"``. Default: ``"train"``.
        max_words (int): question word limit. Default: 50.
        eos (str): end token appended to train answers. Default: ``"[SEP]"``.
        skip_bad_samples (bool): train only; as in :class:`RetrievalTrainDataset`.
        vg_image_root (Optional[PathLike]): directory of the ``"dataset": "vg"`` records'
            images (ALBEF's ``vg_root``); ``image_root`` when None.

    Outputs (``__getitem__``):
        train: ``(image, question, answers: List[str], weights: List[float])``;
        test: ``(image, question, question_id)``.
    """

    def __init__(
        self,
        ann_files: Sequence[PathLike],
        image_root: PathLike,
        transform: Transform,
        split: str = "train",
        max_words: int = 50,
        eos: str = "[SEP]",
        skip_bad_samples: bool = False,
        vg_image_root: Optional[PathLike] = None,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        super().__init__(image_root, transform, skip_bad_samples and split == "train")
        self.split, self.max_words, self.eos = split, max_words, eos
        self.vg_image_root = Path(vg_image_root) if vg_image_root else self.image_root
        keys = ("image", "question", "answer") if split == "train" else ("image", "question", "question_id")
        self.records: List[Dict[str, Any]] = []
        seen_ids: Dict[Any, Tuple[Path, int]] = {}
        for ann_file in _as_files(ann_files):
            for i, rec in enumerate(load_json_list(ann_file, keys)):
                _check_text(rec["question"], ann_file, i, "question", allow_list=False)
                if split == "train" or "answer" in rec:
                    _check_text(rec["answer"], ann_file, i, "answer")
                if rec.get("dataset", "vqa") not in ("vqa", "vg"):
                    raise ValueError(f"{ann_file}: record {i} key 'dataset' must be 'vqa' or 'vg', got {rec['dataset']!r:.80}")
                if split == "test":
                    qid = rec["question_id"]
                    if not isinstance(qid, (int, str)) or isinstance(qid, bool):
                        raise ValueError(f"{ann_file}: record {i} key 'question_id' must be an int or a string, got {qid!r:.80}")
                    if qid in seen_ids:
                        first_file, first = seen_ids[qid]
                        raise ValueError(f"{ann_file}: record {i} repeats question_id {qid!r} of record {first} of {first_file}")
                    seen_ids[qid] = (ann_file, i)
                self.records.append(rec)
                self.sample_source.append((ann_file, i))

    def __len__(self) -> int:
        return len(self.records)

    def _get(self, index: int) -> Tuple[Any, ...]:
        rec = self.records[index]
        if rec.get("dataset", "vqa") == "vg":
            ann_file, record = self.sample_source[index]
            image = self.transform(load_image(self.vg_image_root / rec["image"], record, ann_file))
        else:
            image = self._load(index, rec["image"])
        question = pre_caption(rec["question"], self.max_words)
        if self.split == "test":
            return image, question, rec["question_id"]
        if rec.get("dataset", "vqa") == "vg":
            answers, weights = [rec["answer"] if isinstance(rec["answer"], str) else rec["answer"][0]], [0.5]
        else:
            raw = [rec["answer"]] if isinstance(rec["answer"], str) else rec["answer"]
            counts: Dict[str, float] = {}
            for a in raw:
                counts[a] = counts.get(a, 0.0) + 1.0 / len(raw)
            answers, weights = list(counts), list(counts.values())
        return image, question, [a + self.eos for a in answers], weights

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        return self._get_with_replacement(index, self._get, lambda i: self.records[i]["image"])


def load_answer_list(path: PathLike) -> List[str]:
    """Read a VQA answer list (ALBEF ``answer_list.json``): a JSON list of distinct, non-empty
    strings.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, not a list, empty, or an entry that is not a non-empty string
            or repeats an earlier one; the message names the file and entry index.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"answer list not found: {path}")
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{path}: expected a non-empty JSON list of answer strings")
    first: Dict[str, int] = {}
    for i, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{path}: entry {i} must be a non-empty string, got {answer!r:.80}")
        if answer in first:
            raise ValueError(f"{path}: entry {i} {answer!r} repeats entry {first[answer]}")
        first[answer] = i
    return answers


class VQACollator:
    """Batch VQA samples and tokenise questions and answers (ALBEF ``vqa_collate_fn`` plus the
    tokenisation its training loop does).

    Train samples ``(image, question, answers, weights)`` give ``image`` [B, 3, H, W],
    ``question_ids`` / ``question_mask`` [B, Lq], ``answer_ids`` / ``answer_mask`` [K, La] (all
    answers of the batch, question by question), ``weights`` [K] float and ``question_index``
    [K] (the question of each answer). Test samples ``(image, question, question_id)`` give
    ``image``, ``question_ids``, ``question_mask`` and ``question_id`` (a list, values as in
    the annotation file).

    Args:
        tokenizer: a Hugging Face tokenizer.
        max_question_tokens (Optional[int]): question token limit (ALBEF: 25 in training, none
            at test time). Default: None.
    """

    def __init__(self, tokenizer: Any, max_question_tokens: Optional[int] = None) -> None:
        self.tokenizer = tokenizer
        self.max_question_tokens = max_question_tokens

    def __call__(self, batch: Sequence[Tuple[Any, ...]]) -> Dict[str, Any]:
        if not batch:
            raise ValueError("VQACollator got an empty batch")
        questions = self.tokenizer(
            [sample[1] for sample in batch],
            padding="longest",
            truncation=self.max_question_tokens is not None,
            max_length=self.max_question_tokens,
            return_tensors="pt",
        )
        out: Dict[str, Any] = {
            "image": torch.stack([sample[0] for sample in batch]),
            "question_ids": questions["input_ids"].long(),
            "question_mask": questions["attention_mask"].long(),
        }
        if len(batch[0]) == 3:
            out["question_id"] = [sample[2] for sample in batch]
            return out
        answers = [a for sample in batch for a in sample[2]]
        tokens = self.tokenizer(answers, padding="longest", return_tensors="pt")
        out["answer_ids"] = tokens["input_ids"].long()
        out["answer_mask"] = tokens["attention_mask"].long()
        out["weights"] = torch.tensor([w for sample in batch for w in sample[3]], dtype=torch.float)
        counts = torch.tensor([len(sample[2]) for sample in batch])
        out["question_index"] = torch.arange(len(batch)).repeat_interleave(counts)
        return out


VE_LABELS: Dict[str, int] = {"contradiction": 0, "neutral": 1, "entailment": 2}


class VEDataset(_ImageAnnotationDataset):
    """SNLI-VE pairs (ALBEF ``ve_dataset``): ``{"image": id without extension, "sentence", "label"}``.

    Args:
        ann_file (PathLike): annotation file.
        image_root (PathLike): the image of a record is ``image_root / (id + image_ext)``.
        transform (Callable): PIL image -> tensor.
        max_words (int): sentence word limit. Default: 30.
        image_ext (str): extension appended to ids: ``".jpg"`` for Flickr30K (ALBEF's
            reader hard-codes it), ``".png"`` for the shapes world.
        skip_bad_samples (bool): as in :class:`RetrievalTrainDataset`.

    Outputs (``__getitem__``):
        Tuple[Tensor, str, int]: image, sentence, label (contradiction 0, neutral 1,
        entailment 2).
    """

    def __init__(
        self,
        ann_file: PathLike,
        image_root: PathLike,
        transform: Transform,
        max_words: int = 30,
        image_ext: str = ".jpg",
        skip_bad_samples: bool = False,
    ) -> None:
        super().__init__(image_root, transform, skip_bad_samples)
        self.max_words, self.image_ext = max_words, image_ext
        ann_file = Path(ann_file)
        self.records = load_json_list(ann_file, ("image", "sentence", "label"))
        for i, rec in enumerate(self.records):
            _check_text(rec["sentence"], ann_file, i, "sentence", allow_list=False)
            if rec["label"] not in VE_LABELS:
                raise ValueError(f"{ann_file}: record {i} key 'label' must be one of {list(VE_LABELS)}, got {rec['label']!r}")
            self.sample_source.append((ann_file, i))

    def __len__(self) -> int:
        return len(self.records)

    def _get(self, index: int) -> Tuple[Tensor, str, int]:
        rec = self.records[index]
        image = self._load(index, f"{rec['image']}{self.image_ext}")
        return image, pre_caption(rec["sentence"], self.max_words), VE_LABELS[rec["label"]]

    def __getitem__(self, index: int) -> Tuple[Tensor, str, int]:
        return self._get_with_replacement(index, self._get, lambda i: f"{self.records[i]['image']}{self.image_ext}")


class NLVRDataset(_ImageAnnotationDataset):
    """NLVR2 image pairs (ALBEF ``nlvr_dataset``): ``{"images": [a, b], "sentence", "label": "True"|"False"}``.

    Args:
        ann_file (PathLike): annotation file.
        image_root (PathLike): directory the image paths are relative to.
        transform (Callable): PIL image -> tensor (applied to each image independently).
        max_words (int): sentence word limit. Default: 30.
        skip_bad_samples (bool): as in :class:`RetrievalTrainDataset`.

    Outputs (``__getitem__``):
        Tuple[Tensor, Tensor, str, int]: left image, right image, sentence, label (True 1).
    """

    def __init__(
        self,
        ann_file: PathLike,
        image_root: PathLike,
        transform: Transform,
        max_words: int = 30,
        skip_bad_samples: bool = False,
    ) -> None:
        super().__init__(image_root, transform, skip_bad_samples)
        self.max_words = max_words
        ann_file = Path(ann_file)
        self.records = load_json_list(ann_file, ("images", "sentence", "label"))
        for i, rec in enumerate(self.records):
            images = rec["images"]
            if not (isinstance(images, list) and len(images) == 2 and all(isinstance(x, str) for x in images)):
                raise ValueError(f"{ann_file}: record {i} key 'images' must be a list of two paths, got {images!r:.80}")
            _check_text(rec["sentence"], ann_file, i, "sentence", allow_list=False)
            if rec["label"] not in ("True", "False", True, False):
                raise ValueError(f"{ann_file}: record {i} key 'label' must be 'True' or 'False', got {rec['label']!r}")
            self.sample_source.append((ann_file, i))

    def __len__(self) -> int:
        return len(self.records)

    def _get(self, index: int) -> Tuple[Tensor, Tensor, str, int]:
        rec = self.records[index]
        left, right = (self._load(index, im) for im in rec["images"])
        return left, right, pre_caption(rec["sentence"], self.max_words), int(rec["label"] in ("True", True))

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor, str, int]:
        return self._get_with_replacement(index, self._get, lambda i: self.records[i]["images"][0])


class NLVRCollator(RetrievalCollator):
    """Batch :class:`NLVRDataset` samples ``(image0, image1, sentence, label)``.

    Returns (``__call__``):
        Dict[str, Tensor]: ``image`` ``[B, 2, 3, H, W]`` (each sample's pair, image 0 first),
        ``input_ids`` and ``attention_mask`` ``[B, L]``, and the labels (True 1) in ``idx``
        ``[B]``, where :class:`RetrievalCollator` puts a VE label.
    """

    def __call__(self, batch: Sequence[Tuple[Any, ...]]) -> Dict[str, Tensor]:
        return super().__call__([(torch.stack(sample[:2]), sample[2], sample[3]) for sample in batch])


class GroundingDataset(_ImageAnnotationDataset):
    """Referring expressions (ALBEF ``grounding_dataset``): ``{"image", "text", "ref_id"}``.

    Train mode returns an image index for ITC targets, taken from ``image_id`` when records
    have it and from the image file name otherwise (as ALBEF does).

    Args:
        ann_file (PathLike): annotation file.
        image_root (PathLike): directory the image paths are relative to.
        transform (Callable): PIL image -> tensor.
        split (str): ``"train"`` or ``"test"``. Default: ``"train"``.
        max_words (int): text word limit. Default: 30.
        skip_bad_samples (bool): train only; as in :class:`RetrievalTrainDataset`.

    Outputs (``__getitem__``):
        train: ``(image, text, image_index)``; test: ``(image, text, ref_id)``.
    """

    def __init__(
        self,
        ann_file: PathLike,
        image_root: PathLike,
        transform: Transform,
        split: str = "train",
        max_words: int = 30,
        skip_bad_samples: bool = False,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        super().__init__(image_root, transform, skip_bad_samples and split == "train")
        self.split, self.max_words = split, max_words
        ann_file = Path(ann_file)
        self.records = load_json_list(ann_file, ("image", "text", "ref_id"))
        self.img_ids: Dict[Any, int] = {}
        self.indices: List[int] = []
        for i, rec in enumerate(self.records):
            _check_text(rec["text"], ann_file, i, "text", allow_list=False)
            key = rec.get("image_id", Path(rec["image"]).name)
            self.indices.append(self.img_ids.setdefault(key, len(self.img_ids)))
            self.sample_source.append((ann_file, i))

    def __len__(self) -> int:
        return len(self.records)

    def _get(self, index: int) -> Tuple[Tensor, str, int]:
        rec = self.records[index]
        image = self._load(index, rec["image"])
        third = self.indices[index] if self.split == "train" else rec["ref_id"]
        return image, pre_caption(rec["text"], self.max_words), third

    def __getitem__(self, index: int) -> Tuple[Tensor, str, int]:
        return self._get_with_replacement(index, self._get, lambda i: self.records[i]["image"])
