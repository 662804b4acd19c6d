"""Tests for torchmm_ext.evaluation.retrieval (recall metrics, batched/sharded ITM re-rank)."""

import os
import tempfile
from types import SimpleNamespace
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn, Tensor

from torchmm_ext.evaluation import evaluate_retrieval, recall_metrics, RetrievalScores
from testing_utils import free_port


# ---------------------------------------------------------------------------------------------
# recall_metrics
# ---------------------------------------------------------------------------------------------


def albef_itm_eval(scores_i2t, scores_t2i, img2txt, txt2img) -> Dict[str, float]:
    """Straightforward loop reference with ALBEF's argsort ranking."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        order = np.argsort(score)[::-1]
        ranks[index] = min(np.where(order == i)[0][0] for i in img2txt[index])
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        order = np.argsort(score)[::-1]
        ranks[index] = np.where(order == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    tr_mean, ir_mean = sum(tr) / 3, sum(ir) / 3
    return {
        "txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": tr_mean,
        "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }


def _scores_from_orders(orders: Sequence[Sequence[int]], n_cols: int) -> np.ndarray:
    """Row r gets score n_cols - p for the candidate at position p of orders[r]."""
    scores = np.zeros((len(orders), n_cols))
    for r, order in enumerate(orders):
        assert sorted(order) == list(range(n_cols))
        for p, c in enumerate(order):
            scores[r, c] = n_cols - p
    return scores


def _hand_case():
    # 3 images x 15 texts, 5 captions per image (COCO-like): image i owns texts 5i..5i+4.
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(3)]
    txt2img = [t // 5 for t in range(15)]
    non_gt = lambda i: [t for t in range(15) if t // 5 != i]  # noqa: E731
    orders_i2t = [
        # image 0: caption 0 first -> rank 0 (hit @1, @5, @10)
        [0] + non_gt(0) + [1, 2, 3, 4],
        # image 1: 4 non-captions, then caption 7 -> rank 4 (miss @1, hit @5, @10)
        non_gt(1)[:4] + [7] + non_gt(1)[4:] + [5, 6, 8, 9],
        # image 2: all 10 non-captions first -> best rank 10 (miss @1, @5, @10)
        non_gt(2) + [10, 11, 12, 13, 14],
    ]
    # txt_r1 = 1/3, txt_r5 = 2/3, txt_r10 = 2/3 -> 33.33, 66.67, 66.67; mean 55.56
    orders_t2i = []
    for t in range(15):
        gt = txt2img[t]
        others = [i for i in range(3) if i != gt]
        if t < 6:  # texts 0..5: own image first -> rank 0
            orders_t2i.append([gt] + others)
        elif t < 11:  # texts 6..10: rank 1
            orders_t2i.append([others[0], gt, others[1]])
        else:  # texts 11..14: rank 2
            orders_t2i.append(others + [gt])
    # img_r1 = 6/15 = 40, img_r5 = img_r10 = 100 (only 3 images); mean 80
    return (
        _scores_from_orders(orders_i2t, 15),
        _scores_from_orders(orders_t2i, 3),
        img2txt,
        txt2img,
    )


def test_recall_metrics_hand_made():
    s_i2t, s_t2i, img2txt, txt2img = _hand_case()
    out = recall_metrics(s_i2t, s_t2i, img2txt, txt2img)
    expected = {
        "txt_r1": 100 / 3, "txt_r5": 200 / 3, "txt_r10": 200 / 3, "txt_r_mean": 500 / 9,
        "img_r1": 40.0, "img_r5": 100.0, "img_r10": 100.0, "img_r_mean": 80.0,
        "r_mean": (500 / 9 + 80.0) / 2,
    }
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-9), key
        assert isinstance(out[key], float)
    # Tensor input (and float32) gives the same numbers.
    out_t = recall_metrics(
        torch.from_numpy(s_i2t).float(), torch.from_numpy(s_t2i).float(), img2txt, txt2img
    )
    assert out_t == pytest.approx(out)
    assert albef_itm_eval(s_i2t, s_t2i, img2txt, txt2img) == pytest.approx(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_metrics_matches_albef_loop_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    n_img = 40
    # Ragged caption counts (1..5 per image), texts shuffled.
    caps = rng.integers(1, 6, size=n_img)
    txt2img_sorted = np.repeat(np.arange(n_img), caps)
    perm = rng.permutation(len(txt2img_sorted))
    txt2img = txt2img_sorted[perm].tolist()
    n_txt = len(txt2img)
    img2txt: List[List[int]] = [[] for _ in range(n_img)]
    for t, i in enumerate(txt2img):
        img2txt[i].append(t)
    # Tie-free scores with signal so that recalls are neither 0 nor 100.
    s_i2t = rng.standard_normal((n_img, n_txt))
    s_i2t[np.array(txt2img), np.arange(n_txt)] += 2.0
    s_t2i = rng.standard_normal((n_txt, n_img))
    s_t2i[np.arange(n_txt), np.array(txt2img)] += 2.0
    expected = albef_itm_eval(s_i2t, s_t2i, img2txt, txt2img)
    out = recall_metrics(s_i2t, s_t2i, img2txt, txt2img, chunk_size=7)
    assert out == pytest.approx(expected, abs=1e-9)
    assert 0 < out["txt_r1"] < 100 and 0 < out["img_r1"] < 100


def test_recall_metrics_ties_are_pessimistic():
    # Constant scores: a ground truth tied with non-ground-truths is ranked after them.
    _, _, img2txt, txt2img = _hand_case()
    out = recall_metrics(np.zeros((3, 15)), np.zeros((15, 3)), img2txt, txt2img)
    # i2t rank = 15 - 5 = 10 -> no hit; t2i rank = 3 - 1 = 2 -> miss @1, hit @5/@10
    assert out["txt_r1"] == out["txt_r5"] == out["txt_r10"] == 0.0
    assert out["img_r1"] == 0.0 and out["img_r5"] == 100.0
    # Captions tied with each other only: best caption still ranks first.
    s = np.full((3, 15), -1.0)
    s[0, [0, 1]] = 5.0
    out = recall_metrics(s, np.zeros((15, 3)), img2txt, txt2img)
    assert out["txt_r1"] == pytest.approx(100 / 3)


def test_recall_metrics_validates_shapes():
    _, _, img2txt, txt2img = _hand_case()
    with pytest.raises(ValueError, match="scores_t2i"):
        recall_metrics(np.zeros((3, 15)), np.zeros((3, 15)), img2txt, txt2img)
    with pytest.raises(ValueError, match="img2txt"):
        recall_metrics(np.zeros((3, 15)), np.zeros((15, 3)), img2txt[:2], txt2img)


# ---------------------------------------------------------------------------------------------
# Fake model, tokenizer and data
# ---------------------------------------------------------------------------------------------


class Encoding(NamedTuple):
    embeddings: Tensor
    features: Tensor


class FakeTokenizer:
    """Word-level tokenizer: [CLS]=1, words 2.., pad 0; HF call convention."""

    def __init__(self, texts: Sequence[str]) -> None:
        words = sorted({w for t in texts for w in t.split()})
        self.vocab = {w: i + 2 for i, w in enumerate(words)}
        self.calls: List[int] = []

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        assert padding == "longest" and truncation and return_tensors == "pt"
        self.calls.append(len(texts))
        ids = [([1] + [self.vocab[w] for w in t.split()])[:max_length] for t in texts]
        length = max(len(x) for x in ids)
        input_ids = torch.zeros(len(ids), length, dtype=torch.long)
        mask = torch.zeros(len(ids), length, dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


class FakeRetrievalModel(nn.Module):
    """Deterministic stand-in: random fixed projections; ITM = <mean image, masked mean text>."""

    def __init__(self, vocab_size: int, seed: int = 0, dv: int = 8, dt: int = 6, e: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n_tokens, self.dv = 4, dv
        self.w_img = nn.Parameter(torch.randn(3 * 4 * 4, self.n_tokens * dv, generator=g))
        self.tok = nn.Parameter(torch.randn(vocab_size, dt, generator=g))
        self.p_img = nn.Parameter(torch.randn(dv, e, generator=g))
        self.p_txt = nn.Parameter(torch.randn(dt, e, generator=g))
        self.m = nn.Parameter(torch.randn(dv, dt, generator=g))
        self.images_encoded = 0
        self.texts_encoded = 0
        self.itm_pairs: List[int] = []
        self.unique_images: List[int] = []
        self.modes: List[bool] = []

    def encode_image(self, images: Tensor) -> Encoding:
        self.images_encoded += images.size(0)
        self.modes.append(self.training)
        emb = torch.tanh(images.flatten(1) @ self.w_img).view(-1, self.n_tokens, self.dv)
        return Encoding(emb, F.normalize(emb[:, 0] @ self.p_img, dim=-1))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Encoding:
        self.texts_encoded += input_ids.size(0)
        emb = self.tok[input_ids]
        # Garbage at padded positions: only the mask may hide it.
        emb = torch.where(attention_mask[..., None].bool(), emb, torch.full_like(emb, 7.0))
        return Encoding(emb, F.normalize(self._pool_text(emb, attention_mask) @ self.p_txt, dim=-1))

    @staticmethod
    def _pool_text(emb: Tensor, mask: Tensor) -> Tensor:
        m = mask[..., None].to(emb.dtype)
        return (emb * m).sum(1) / m.sum(1).clamp(min=1)

    def itm_scores(self, image_embeddings: Tensor, text_embeddings: Tensor,
                   text_attention_mask: Tensor, image_index: Optional[Tensor] = None) -> Tensor:
        if image_index is not None:
            assert image_index.max() < image_embeddings.size(0)
            self.unique_images.append(image_embeddings.size(0))
            image_embeddings = image_embeddings[image_index]
        assert image_embeddings.size(0) == text_embeddings.size(0) == text_attention_mask.size(0)
        assert text_embeddings.shape[:2] == text_attention_mask.shape
        self.itm_pairs.append(image_embeddings.size(0))
        img = image_embeddings.mean(1) @ self.m  # [P, Dt]
        return (img * self._pool_text(text_embeddings, text_attention_mask)).sum(-1)


WORDS = "a red blue green small big circle square triangle left right top bottom of the".split()


def make_data(n_img: int, caps_per_img: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_img, 3, 4, 4, generator=g)
    text, txt2img, img2txt = [], [], []
    for i in range(n_img):
        img2txt.append([])
        for _ in range(caps_per_img):
            n_words = int(torch.randint(1, 9, (1,), generator=g))
            words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n_words,), generator=g)]
            img2txt[i].append(len(text))
            txt2img.append(i)
            text.append(" ".join(words))
    dataset = SimpleNamespace(text=text, txt2img=txt2img, img2txt=img2txt)
    return images, dataset


def make_loader(images: Tensor, batch_size: int = 3):
    return [
        (images[s : s + batch_size], torch.arange(s, min(s + batch_size, len(images))))
        for s in range(0, len(images), batch_size)
    ]


def brute_force(model: FakeRetrievalModel, images: Tensor, dataset, tokenizer, max_length=30):
    """Every pair scored one at a time; full ITM and ITC matrices [N_img, N_txt]."""
    with torch.no_grad():
        img = [model.encode_image(images[i : i + 1]) for i in range(len(images))]
        txt = []
        for t in dataset.text:
            tok = tokenizer([t], padding="longest", truncation=True, max_length=max_length,
                            return_tensors="pt")
            txt.append((model.encode_text(tok["input_ids"], tok["attention_mask"]),
                        tok["attention_mask"]))
        itm = torch.zeros(len(img), len(txt))
        sims = torch.zeros(len(img), len(txt))
        for i, ie in enumerate(img):
            for t, (te, mask) in enumerate(txt):
                itm[i, t] = model.itm_scores(ie.embeddings, te.embeddings, mask)[0]
                sims[i, t] = (ie.features @ te.features.t())[0, 0]
    return itm, sims


def expected_scores(itm: Tensor, sims: Tensor, k: int, add_itc: bool) -> Tensor:
    """Top-k of each row of `sims` keep itm (+ sims), the rest -100."""
    out = torch.full_like(itm, -100.0)
    idx = sims.topk(min(k, sims.size(1)), dim=1).indices
    val = itm.gather(1, idx) + (sims.gather(1, idx) if add_itc else 0)
    return out.scatter_(1, idx, val)


# ---------------------------------------------------------------------------------------------
# evaluate_retrieval
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_itc", [False, True])
def test_evaluate_retrieval_matches_brute_force(add_itc):
    images, dataset = make_data(n_img=9, caps_per_img=3)  # 9 images, 27 texts
    tokenizer = FakeTokenizer(dataset.text)
    model = FakeRetrievalModel(vocab_size=len(WORDS) + 2)
    itm_ref, sims_ref = brute_force(model, images, dataset, tokenizer)

    model = FakeRetrievalModel(vocab_size=len(WORDS) + 2)  # fresh counters, same weights
    model.train()
    tokenizer.calls.clear()
    k, itm_bs = 4, 5
    out = evaluate_retrieval(
        model, make_loader(images), dataset, tokenizer, device="cpu", k_test=k,
        text_batch_size=10, itm_batch_size=itm_bs, add_itc=add_itc, show_progress=False,
    )
    assert isinstance(out, RetrievalScores)
    assert out.scores_i2t.shape == (9, 27) and out.scores_t2i.shape == (27, 9)
    assert out.sims.dtype == out.scores_i2t.dtype == torch.float32
    torch.testing.assert_close(out.sims, sims_ref, atol=1e-5, rtol=1e-5)

    # Candidates are chosen from out.sims (close to sims_ref, avoids fp near-ties at the border).
    exp_i2t = expected_scores(itm_ref, out.sims, k, add_itc)
    exp_t2i = expected_scores(itm_ref.t(), out.sims.t(), k, add_itc)
    torch.testing.assert_close(out.scores_i2t, exp_i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.scores_t2i, exp_t2i, atol=1e-5, rtol=1e-5)
    assert ((out.scores_i2t != -100).sum(1) == k).all()
    assert ((out.scores_t2i != -100).sum(1) == k).all()

    # Every image and text encoded exactly once, in eval mode; training flag restored.
    assert model.images_encoded == 9 and model.texts_encoded == 27
    assert tokenizer.calls == [10, 10, 7]
    assert model.modes and not any(model.modes)
    assert model.training
    # ITM batched: chunks of at most itm_batch_size pairs, far fewer calls than pairs.
    n_pairs = 9 * k + 27 * k
    assert sum(model.itm_pairs) == n_pairs
    assert max(model.itm_pairs) <= itm_bs
    assert len(model.itm_pairs) == -(-9 * k // itm_bs) + -(-27 * k // itm_bs)
    # Each chunk passes its distinct images once: i2t chunks (row-major over images) hold at
    # most ceil(itm_bs / k) + 1 images, far fewer than their pairs.
    assert len(model.unique_images) == len(model.itm_pairs)
    assert all(u <= min(p, 9) for u, p in zip(model.unique_images, model.itm_pairs))
    assert model.unique_images[0] <= -(-itm_bs // k) + 1 < model.itm_pairs[0]

    metrics = recall_metrics(out.scores_i2t, out.scores_t2i, dataset.img2txt, dataset.txt2img)
    assert 0.0 <= metrics["r_mean"] <= 100.0


def test_evaluate_retrieval_k_test_clamped_and_loader_order():
    images, dataset = make_data(n_img=4, caps_per_img=2)  # 4 images, 8 texts
    tokenizer = FakeTokenizer(dataset.text)
    model = FakeRetrievalModel(vocab_size=len(WORDS) + 2)
    itm_ref, _ = brute_force(model, images, dataset, tokenizer)
    # Loader in reverse order: rows are placed by the yielded indices.
    loader = make_loader(images, batch_size=3)[::-1]
    out = evaluate_retrieval(
        model, loader, dataset, tokenizer, device="cpu", k_test=256, itm_batch_size=7,
        show_progress=True,
    )
    # k clamped to 8 texts / 4 images: everything is re-ranked, nothing at -100.
    torch.testing.assert_close(out.scores_i2t, itm_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.scores_t2i, itm_ref.t(), atol=1e-5, rtol=1e-5)


def test_evaluate_retrieval_rejects_incomplete_loader():
    images, dataset = make_data(n_img=4)
    tokenizer = FakeTokenizer(dataset.text)
    model = FakeRetrievalModel(vocab_size=len(WORDS) + 2)
    with pytest.raises(ValueError, match="did not yield every image"):
        evaluate_retrieval(model, make_loader(images)[:1], dataset, tokenizer, device="cpu",
                           show_progress=False)
    with pytest.raises(ValueError, match="twice"):
        evaluate_retrieval(model, make_loader(images) * 2, dataset, tokenizer, device="cpu",
                           show_progress=False)


# ---------------------------------------------------------------------------------------------
# Sharding over 2 gloo processes
# ---------------------------------------------------------------------------------------------

DIST_KW = dict(k_test=3, text_batch_size=6, itm_batch_size=4, add_itc=True, show_progress=False)
DIST_N_IMG = 7  # 7 images, 14 texts: rows do not split evenly over 2 ranks


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        images, dataset = make_data(n_img=DIST_N_IMG)
        tokenizer = FakeTokenizer(dataset.text)
        model = FakeRetrievalModel(vocab_size=len(WORDS) + 2)
        out = evaluate_retrieval(model, make_loader(images), dataset, tokenizer, device="cpu",
                                 **DIST_KW)
        torch.save(
            {"out": tuple(out), "itm_pairs": sum(model.itm_pairs),
             "images": model.images_encoded, "texts": model.texts_encoded},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_evaluate_retrieval_sharded_matches_single_process():
    images, dataset = make_data(n_img=DIST_N_IMG)
    tokenizer = FakeTokenizer(dataset.text)
    model = FakeRetrievalModel(vocab_size=len(WORDS) + 2)
    single = evaluate_retrieval(model, make_loader(images), dataset, tokenizer, device="cpu",
                                **DIST_KW)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_dist_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), map_location="cpu") for r in range(2)]
    n_txt = len(dataset.text)
    k = DIST_KW["k_test"]
    for res in results:
        for got, want in zip(res["out"], single):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        assert res["images"] == DIST_N_IMG and res["texts"] == n_txt
    # Rows split 4/3 (images) and 7/7 (texts): each rank re-ranks only its own share.
    assert results[0]["itm_pairs"] == 4 * k + 7 * k
    assert results[1]["itm_pairs"] == 3 * k + 7 * k
    # Entries outside the top-k are exactly -100 on every rank (not -100 * world_size).
    assert set(results[1]["out"][0].unique().tolist()) >= {-100.0}
    assert (results[1]["out"][0] >= -100.0).all()
    assert ((results[1]["out"][0] == -100.0).sum(1) == n_txt - k).all()
