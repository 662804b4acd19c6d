"""The DAS search: which blocks a task can skip, found with a REINFORCE-style bandit.

As published (DoubtedSteam/DAS, ``vilt_module_search.py`` / ``meter_module_search.py``):

* one gate ``g`` per candidate block (a buffer, 0 at the start, never touched by the
  optimizer); ``sigmoid(g)`` is the block's probability of being skipped;
* every training step skips ``k = skip_num`` blocks drawn without replacement with
  ``torch.multinomial(sigmoid(g), k)``; the adapters and heads train with that sub-network;
* after ``warmup_epochs`` (1), every ``das_turn`` (10) steps, ``das_step`` (3) *distinct* skip
  sets are drawn and scored on a validation batch: reward ``r_j = exp(-loss_j)``, baseline
  ``mean(r)``, and for each block ``i`` of set ``j``:
  ``g_i += lr * (r_j - mean(r)) * sigmoid(g_i) * (1 - sigmoid(g_i))`` (probabilities taken
  before the update; ``lr`` 1.0);
* the ``k`` blocks with the largest gates are the result (taken at every epoch end; the last
  epoch's is the answer).

Differences, on purpose: each round scores a *fresh* random validation batch (the published
ViLT/METER code rebuilds its validation loader without ``set_epoch`` and so scores the same
first batch every round; ``reuse_batch: true`` does that); the scoring passes run in eval mode
(no dropout) and leave buffers (queues) and momentum copies as they were, because ALBEF's
forward updates them; draws use the search's own generator, saved with its state, so a resumed
search continues with the same gates and the same random draws.

The searcher is a module (``model.das_search``, installed by
:func:`~torchmm_ext.modules.adapters.apply_das` with ``search=...``), so its gates and state
travel in the model's checkpoints. The training loop drives it through a step hook
(:meth:`DASSearch.make_step_hook`, collected by
:func:`torchmm_ext.engine.efficiency.method_step_hooks`).
"""

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn, Tensor

# (model, ctx, run_step) -> None, run after every optimizer step; run_step(batch) computes the
# recipe's StepOutput for a batch the way the training step does (device, autocast).
StepHook = Callable[[nn.Module, Any, Callable[[Any], Any]], None]


@dataclass
class DASSearchConfig:
    """The ``das.search`` section.

    Attributes:
        skip_num (int): blocks skipped per forward, ``k`` (ViLT scripts: 1, METER: 4).
        groups (Optional[List[str]]): the candidate groups (default: every DAS group).
        das_step (int): skip sets scored per round (3).
        das_turn (int): training steps between rounds (10).
        warmup_epochs (int): epochs without gate updates (1).
        lr (float): gate learning rate (1.0).
        seed (int): seed of the search's own generator.
        reuse_batch (bool): score every round on the same validation batch, as the published
            code does in effect (default: a fresh batch each round).
        output (Optional[str]): a ``skip.json`` to (re)write at every epoch end.
        epochs (Optional[int]): training epochs of a search run (``examples/das/search.py`` sets
            ``train.epochs`` to it; published: 3, the first a warm-up).
        max_steps_per_epoch (Optional[int]): training steps per search epoch
            (``examples/das/search.py`` sets ``train.max_steps_per_epoch`` to it unless the
            command line sets that; published: whole epochs). With ``das_turn`` it fixes the number of rounds:
            ``(epochs - warmup_epochs) * max_steps_per_epoch // das_turn``.
    """

    skip_num: int = 1
    groups: Optional[List[str]] = None
    das_step: int = 3
    das_turn: int = 10
    warmup_epochs: int = 1
    lr: float = 1.0
    seed: int = 0
    reuse_batch: bool = False
    output: Optional[str] = None
    epochs: Optional[int] = None
    max_steps_per_epoch: Optional[int] = None

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> "DASSearchConfig":
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in section if k not in valid]
        if unknown:
            raise ValueError(f"das.search: unknown key(s) {unknown}; valid keys: {valid}")
        cfg = cls(**section)
        for key in ("skip_num", "das_step", "das_turn"):
            if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 1:
                raise ValueError(f"das.search.{key} must be a positive integer, got {getattr(cfg, key)!r}")
        return cfg


def gate_update(gates: Tensor, skip_sets: Sequence[Sequence[int]], rewards: Sequence[float], lr: float) -> Tensor:
    """DAS's gate update (a gradient-bandit step through the sigmoid).

    Args:
        gates (Tensor): ``[C]`` current gates.
        skip_sets (Sequence[Sequence[int]]): the scored skip sets.
        rewards (Sequence[float]): their rewards ``exp(-loss)``.
        lr (float): step size.

    Returns:
        Tensor: new gates: for each set ``j`` and block ``i`` in it,
        ``g_i += lr * (r_j - mean(r)) * p_i * (1 - p_i)`` with ``p = sigmoid(gates)`` before
        the update.
    """
    prob = torch.sigmoid(gates)
    baseline = sum(rewards) / len(rewards)
    new = gates.clone()
    for skip_set, reward in zip(skip_sets, rewards):
        for i in skip_set:
            new[i] += lr * (reward - baseline) * prob[i] * (1 - prob[i])
    return new


def sample_skip_sets(prob: Tensor, k: int, n: int, generator: torch.Generator) -> List[List[int]]:
    """``n`` distinct sorted skip sets of ``k`` blocks, each drawn without replacement from
    ``prob`` (``torch.multinomial``); a repeated set is redrawn, as published."""
    if n > math.comb(prob.numel(), k):
        raise ValueError(f"cannot draw {n} distinct sets of {k} out of {prob.numel()} candidates")
    sets: List[List[int]] = []
    while len(sets) < n:
        drawn = sorted(torch.multinomial(prob, k, replacement=False, generator=generator).tolist())
        if drawn not in sets:
            sets.append(drawn)
    return sets


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _volatile_tensors(model: nn.Module) -> List[Tensor]:
    """What a forward pass may change besides activations: buffers (ALBEF's queues) and the
    momentum (``*_m``) copies, which ALBEF's retrieval forward EMA-updates even in eval mode
    (frozen online weights do not make them constant: published momentum weights differ)."""
    model = _unwrap(model)
    volatile = [b for n, b in model.named_buffers() if not n.startswith("das_search.")]
    volatile += [p for n, p in model.named_parameters() if n.partition(".")[0].endswith("_m")]
    return volatile


class DASSearch(nn.Module):
    """The search state and its rounds.

    Args:
        candidates (Sequence[Tuple[str, int]]): ``(group, index)`` of each candidate, in gate
            order.
        blocks (Sequence[Sequence[nn.Module]]): for each candidate, its
            :class:`~torchmm_ext.modules.adapters.SkippableBlock` and those of its momentum
            copies (all switched together).
        cfg (DASSearchConfig): the settings.
        model_name (str): the model's class name (written into ``skip.json``).
        group_sizes (Mapping[str, int]): block count of every DAS group (written too).

    Raises:
        ValueError: ``skip_num`` larger than the candidates, or ``das_step`` larger than the
            number of distinct skip sets.
    """

    # A skipped candidate's parallel adapters get no gradient in that step: under torchrun the
    # recipes' DDP wrapper (torchmm_ext.engine.wrap_ddp) turns find_unused_parameters on.
    ddp_find_unused_parameters = True

    def __init__(
        self,
        candidates: Sequence[Tuple[str, int]],
        blocks: Sequence[Sequence[nn.Module]],
        cfg: DASSearchConfig,
        model_name: str,
        group_sizes: Mapping[str, int],
    ) -> None:
        super().__init__()
        n = len(candidates)
        if cfg.skip_num > n:
            raise ValueError(f"das.search.skip_num={cfg.skip_num} is larger than the {n} candidate blocks "
                             f"({sorted({g for g, _ in candidates})})")
        if cfg.das_step > math.comb(n, cfg.skip_num):
            raise ValueError(f"das.search.das_step={cfg.das_step}: there are only {math.comb(n, cfg.skip_num)} "
                             f"distinct sets of {cfg.skip_num} among {n} candidates")
        self.cfg = cfg
        self.candidates = [tuple(c) for c in candidates]
        self.model_name = model_name
        self.group_sizes = dict(group_sizes)
        self._blocks = [list(b) for b in blocks]  # registered in the model already, not here
        self.register_buffer("gates", torch.zeros(n))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.steps_since_round = 0
        self.gate_history: List[List[float]] = []
        self.reward_history: List[Dict[str, Any]] = []
        self.epoch_results: List[Dict[str, Any]] = []
        self.reuse_indices: Optional[List[int]] = None
        self.current = self.draw_training_set()

    # -- skip sets -------------------------------------------------------------------------------

    def set_skipped(self, indices: Sequence[int]) -> None:
        """Skip exactly the candidates ``indices`` (online and momentum copies)."""
        chosen = set(indices)
        for i, copies in enumerate(self._blocks):
            for block in copies:
                block.skipped = i in chosen

    def draw_training_set(self) -> List[int]:
        """Draw (and switch to) the skip set of the next training step."""
        prob = torch.sigmoid(self.gates.detach().float().cpu())
        self.current = torch.multinomial(prob, self.cfg.skip_num, generator=self.generator).tolist()
        self.set_skipped(self.current)
        return self.current

    def top_k(self) -> List[int]:
        """The ``skip_num`` candidates with the largest gates (sorted by index)."""
        order = torch.sort(self.gates.detach().cpu(), stable=True).indices
        return sorted(order[-self.cfg.skip_num:].tolist())

    # -- the rounds ------------------------------------------------------------------------------

    def make_step_hook(self, dataset: Any, collate_fn: Callable, batch_size: int, name: str) -> StepHook:
        """The hook the training loop calls after every optimizer step.

        Args:
            dataset (Any): held-out records in training format (the validation split read like
                the training split).
            collate_fn (Callable): the training collator.
            batch_size (int): records per scored batch (the published search uses the
                per-GPU training batch size).
            name (str): what the data is, for messages (e.g. the file).

        Raises:
            ValueError: the held-out data is empty.
        """
        if len(dataset) == 0:
            raise ValueError(f"the DAS search scores skip sets on held-out batches, but {name} is empty")

        def hook(model: nn.Module, ctx: Any, run_step: Callable[[Any], Any]) -> None:
            self.after_step(model, ctx, run_step, lambda: self._heldout_batch(dataset, collate_fn, batch_size))

        return hook

    def _heldout_batch(self, dataset: Any, collate_fn: Callable, batch_size: int) -> Any:
        if self.cfg.reuse_batch and self.reuse_indices is not None:
            indices = self.reuse_indices
        else:
            indices = torch.randperm(len(dataset), generator=self.generator)[:batch_size].tolist()
            self.reuse_indices = indices
        return collate_fn([dataset[i] for i in indices])

    def after_step(self, model: nn.Module, ctx: Any, run_step: Callable[[Any], Any],
                   heldout_batch: Callable[[], Any]) -> None:
        """Count the step, run a round when due, note the epoch's top-k at its end, and draw
        the next training skip set."""
        self.steps_since_round += 1
        if self.steps_since_round >= self.cfg.das_turn and ctx.epoch >= self.cfg.warmup_epochs:
            self.steps_since_round = 0
            self.search_round(model, run_step, heldout_batch(), epoch=ctx.epoch, step=ctx.global_step)
        if ctx.step_in_epoch + 1 == ctx.steps_per_epoch:
            self.epoch_results.append({"epoch": ctx.epoch, "skip": self.top_k(),
                                       "gates": self.gates.tolist()})
            if self.cfg.output:
                self.write(self.cfg.output)
        self.draw_training_set()

    def score(self, model: nn.Module, run_step: Callable[[Any], Any], batch: Any,
              skip_sets: Sequence[Sequence[int]]) -> List[float]:
        """The loss of each skip set on ``batch``: eval mode, no gradient, the global RNG and
        the model's buffers and momentum copies left as they were."""
        volatile = _volatile_tensors(model)
        saved = [t.detach().clone() for t in volatile]
        was_training = model.training
        losses = []
        try:
            model.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                for skip_set in skip_sets:
                    self.set_skipped(skip_set)
                    losses.append(float(run_step(batch).loss))
        finally:
            model.train(was_training)
            with torch.no_grad():
                for t, s in zip(volatile, saved):
                    t.copy_(s)
        return losses

    def search_round(self, model: nn.Module, run_step: Callable[[Any], Any], batch: Any,
                     epoch: int = 0, step: int = 0) -> List[float]:
        """Draw ``das_step`` distinct skip sets, score them on ``batch``, update the gates."""
        prob = torch.sigmoid(self.gates.detach().float().cpu())
        skip_sets = sample_skip_sets(prob, self.cfg.skip_num, self.cfg.das_step, self.generator)
        losses = self.score(model, run_step, batch, skip_sets)
        rewards = [math.exp(-loss) for loss in losses]
        with torch.no_grad():
            self.gates.copy_(gate_update(self.gates.detach().float().cpu(), skip_sets, rewards, self.cfg.lr))
        self.gate_history.append(self.gates.tolist())
        self.reward_history.append({"epoch": epoch, "step": step, "skip_sets": skip_sets,
                                    "losses": losses, "rewards": rewards})
        return rewards

    # -- state and result ------------------------------------------------------------------------

    def get_extra_state(self) -> Dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "steps_since_round": self.steps_since_round,
            "current": list(self.current),
            "gate_history": self.gate_history,
            "reward_history": self.reward_history,
            "epoch_results": self.epoch_results,
            "reuse_indices": self.reuse_indices,
        }

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.steps_since_round = int(state["steps_since_round"])
        self.current = list(state["current"])
        self.gate_history = list(state["gate_history"])
        self.reward_history = list(state["reward_history"])
        self.epoch_results = list(state["epoch_results"])
        self.reuse_indices = state["reuse_indices"]
        self.set_skipped(self.current)

    def result(self) -> Dict[str, Any]:
        """What ``skip.json`` holds: the chosen blocks (``skip``, by group, what
        ``das.skip_from`` reads), the final gates and the gate and reward histories."""
        chosen = self.top_k()
        skip: Dict[str, List[int]] = {}
        for i in chosen:
            group, index = self.candidates[i]
            skip.setdefault(group, []).append(index)
        return {
            "method": "das",
            "model": self.model_name,
            "group_sizes": self.group_sizes,
            "candidates": [list(c) for c in self.candidates],
            "skip_num": self.cfg.skip_num,
            "skip": skip,
            "skip_candidates": chosen,
            "gates": self.gates.tolist(),
            "gate_history": self.gate_history,
            "reward_history": self.reward_history,
            "epochs": self.epoch_results,
            "settings": asdict(self.cfg),
            "heldout": "the same batch every round" if self.cfg.reuse_batch else "a fresh random batch every round",
        }

    def write(self, path: str) -> None:
        """Write :meth:`result` to ``path`` atomically (rank 0 only under torchrun)."""
        if int(os.environ.get("RANK", "0")) != 0:
            return
        path_ = Path(path)
        path_.parent.mkdir(parents=True, exist_ok=True)
        tmp = path_.with_suffix(path_.suffix + ".tmp")
        tmp.write_text(json.dumps(self.result(), indent=1))
        tmp.replace(path_)
