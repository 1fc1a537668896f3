"""UniversalTrainer: trains any method expressible as per-layer loss weights, and evaluates
it with max-softmax routing (docs/design.md §2–3)."""
import contextlib
import functools
import math
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed, routing
from .config import EVAL_MODES, TrainConfig, UniversalConfig
from .kernels import exit_confidence, resolve_backend, weighted_linear_cross_entropy

Batch = Tuple[torch.Tensor, torch.Tensor]


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of every group's base LR at ``step``: linear warmup, then cosine decay to
    ``min_lr_ratio``. The same factor for all groups keeps the layer-wise ratios."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    p = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


class EarlyStopping:
    """Early stopping on validation perplexity: ``update`` returns True once ``patience``
    periodic evaluations in a row have failed to beat the best val ppl so far (a NaN never
    beats it). A pure function of the (step, ppl) pairs fed in step order, so a resumed run
    rebuilds it from the evaluations it logged."""

    def __init__(self, patience: int):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        self.patience, self.best_ppl, self.best_step, self.bad = patience, math.inf, None, 0

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience

    def update(self, step: int, ppl: float) -> bool:
        if ppl < self.best_ppl:
            self.best_ppl, self.best_step, self.bad = ppl, step, 0
        else:
            self.bad += 1
        return self.stop

    def summary(self) -> Dict[str, float]:
        return dict(best_step=self.best_step, best_val_ppl=self.best_ppl)


class UniversalTrainer:
    """Loss, optimizer, training loop and routed evaluation for one ``UniversalConfig``.

    ``progress`` (step / total steps) is owned by ``fit``; outside it, ``compute_loss`` uses the
    progress of the last step run (0 before any), which sets the alpha schedule's weights.
    ``compute_dtype`` torch.bfloat16: mixed precision, ``fit`` and ``evaluate`` under
    ``torch.autocast`` (``autocast``) with fp32 weights, gradients and optimizer state.
    """

    def __init__(self, config: UniversalConfig, vocab_size: int, device="cpu", backend: str = "auto",
                 seed: int = 0, compute_dtype: Optional[torch.dtype] = None):
        if not isinstance(config, UniversalConfig):
            raise TypeError(f"config must be a UniversalConfig, got {type(config).__name__}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        resolve_backend(backend)  # rejects unknown names now rather than at the first step
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if compute_dtype not in (None, torch.bfloat16):
            raise ValueError(f"compute_dtype must be None (fp32) or torch.bfloat16 (autocast; fp16 would need "
                             f"loss scaling), got {compute_dtype!r}")
        self.config, self.vocab_size, self.backend, self.seed = config, vocab_size, backend, seed
        self.compute_dtype = compute_dtype
        self.device = torch.device(device)
        self.step, self.total_steps, self.optimizer = 0, None, None

    def autocast(self):
        """``torch.autocast`` to ``compute_dtype`` on the trainer's device, or a no-op without one:
        ``fit`` runs each step's loss under it, ``evaluate`` its forwards. Weights, gradients and
        the optimizer stay fp32; the fused loss and the confidence kernel take autocast's dtype."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, self.compute_dtype)

    @property
    def progress(self) -> float:
        return 0.0 if not self.total_steps else min(1.0, self.step / self.total_steps)

    def layer_weights(self, n_layers: int) -> Dict[int, float]:
        """Loss weight of each layer 1..n_layers at the current progress."""
        self.config.validate_for(n_layers)
        return self.config.weights_at(self.progress, n_layers)

    # ----------------------------------------------------------------------------- loss
    def compute_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     drops: Optional[Sequence[Sequence[bool]]] = None) -> torch.Tensor:
        """sum over layers with weight > 0 of weight * mean CE(layer logits, y), plus the
        self-distillation terms when the config's ``distill_weight`` > 0, plus with
        confidence "learned" and ``confidence_loss_weight`` > 0 the confidence heads' loss
        (``confidence_loss``).

        x, y: (B, T) int64. An ``EarlyExitTransformer`` goes through the fused kernel and runs
        no block above the deepest weighted layer; any other model whose forward returns a list
        of per-layer logits (B, T, V) (the seed's style) is scored from those logits. Given the
        module ``distributed.wrap`` returned (DDP, FSDP2), x and y are this rank's rows, the
        loss runs inside that module's forward, and the mean is over the scored tokens of the
        global batch (``distributed.global_token_mean``). ``drops[l][b]``: row b of x skips
        block l + 1 (layer dropout; ``fit`` draws them from the config's ``layer_dropout``).
        """
        x, y = x.to(self.device), y.to(self.device)
        if distributed.is_wrapped(model):  # under FSDP2 the head weight is unsharded only in the root's forward
            return model(self._loss, x, y, drops, across_ranks=True)
        return self._loss(model, x, y, drops)

    def layer_drops(self, n_layers: int, batch_size: int, across_ranks: bool = False) -> Optional[List[List[bool]]]:
        """Layer-dropout draws (n_layers lists of batch_size bools) for the current step, None
        when layer dropout is off; a function of (seed, step), so resuming drops the same
        sequences. ``across_ranks``: batch_size rows are this rank's share of a global batch,
        and the draws are this rank's rows of the global batch's (any number of ranks drops
        what one process would)."""
        if self.config.layer_dropout is None or self.config.layer_dropout.max_rate == 0:
            return None
        world = distributed.world_size() if across_ranks else 1
        draws = self.config.layer_dropout.draw(n_layers, batch_size * world, self.seed, self.step)
        rows = distributed.rank_rows(batch_size * world) if across_ranks else slice(None)
        return [layer[rows] for layer in draws]

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, drops=None,
              across_ranks: bool = False) -> torch.Tensor:
        """The weighted loss of one batch: its token mean, or with ``across_ranks`` this rank's
        summed loss turned into its share of the global token mean."""
        reduction = "sum" if across_ranks else "mean"
        learned = self._confidence_layers(model)  # exits with a confidence head to train (and their labels' layers)
        if not hasattr(model, "exit_hidden_states"):
            loss = self._loss_from_logits(model(x), y, reduction)
        else:
            self._check_vocab(model.lm_head.weight.shape[0])
            distributed.check_unsharded(model.lm_head.weight)
            weights = self.layer_weights(model.n_layers)
            layers = [i for i, w in weights.items() if w > 0]
            distill = self._distill_options(model.n_layers, layers)
            scored = distill.pop("layers")
            run = scored + [i for i in learned if i not in scored]  # one pass for the CE and the heads' inputs
            states = [h.reshape(-1, h.shape[-1]) for h in model.exit_hidden_states(x, run, drops=drops)]
            hiddens = states[:len(scored)]
            if "teacher" not in distill and "distill_weight" in distill:  # the final layer is not weighted
                distill["teacher"] = hiddens.pop().detach()
            loss = weighted_linear_cross_entropy(hiddens, model.lm_head.weight, y.reshape(-1),
                                                 [weights[i] for i in layers], reduction=reduction,
                                                 backend=self.backend, return_argmax=bool(learned), **distill)
            if learned:  # the weighted layers' argmax comes with their loss: no head pass for their labels
                loss, argmax = loss
                loss = loss + self.confidence_loss(model, dict(zip(run, states)), y, reduction,
                                                   preds={i: a for i, a in zip(layers, argmax) if a is not None})
        return distributed.global_token_mean(loss, y) if across_ranks else loss

    def _confidence_layers(self, model: nn.Module) -> List[int]:
        """The layers whose states the confidence loss needs: every exit, and with the
        consistency label the final layer; none unless confidence is "learned" with
        confidence_loss_weight > 0. Checks that the model has the heads."""
        cfg = self.config
        if cfg.confidence != "learned" or not cfg.confidence_loss_weight:
            return []
        routing.check_confidence_heads(model, cfg.exits)
        n_layers = model.n_layers
        return cfg.exits + ([n_layers] if cfg.confidence_label == "consistency" and n_layers not in cfg.exits else [])

    def confidence_loss(self, model: nn.Module, states: Dict[int, torch.Tensor], y: torch.Tensor,
                        reduction: str = "mean", ignore_index: int = -100,
                        preds: Optional[Dict[int, torch.Tensor]] = None) -> torch.Tensor:
        """``confidence_loss_weight`` * the binary cross-entropy of every exit's confidence
        logit (``model.confidence_heads``) against its label, averaged over the exits and (with
        reduction 'mean'; 'sum' sums) over the scored tokens.

        states: {layer: exit-normed states (N, d)} of every exit and, for the "consistency"
        label, of the final layer; y: (B, T) or (N,) int64 targets. The label of a token at
        exit e is 1 where e's argmax equals the final layer's ("consistency") or the target
        ("correct"), from ``exit_confidence`` under no_grad: no [N, V] logits. preds: {layer:
        argmax (N,) int64} of layers already known (``compute_loss`` passes the weighted layers',
        which the fused loss returns); only the other layers take a head pass. Ignored rows are
        masked out, so their values there do not matter. Without ``confidence_backbone_grad``
        the heads see detached states, so this loss trains them alone.
        """
        cfg, weight, y, preds = self.config, model.lm_head.weight.detach(), y.reshape(-1), preds or {}
        valid = y != ignore_index

        def pred(layer: int) -> torch.Tensor:
            if layer in preds:
                return preds[layer]
            return exit_confidence(states[layer].detach(), weight, backend=self.backend).pred

        agree_with = y if cfg.confidence_label == "correct" else pred(model.n_layers)
        total = 0.0
        for layer in cfg.exits:
            h = states[layer] if cfg.confidence_backbone_grad else states[layer].detach()
            label = (pred(layer) == agree_with).to(torch.float32)
            bce = F.binary_cross_entropy_with_logits(model.confidence_heads.logit(layer, h), label, reduction="none")
            total = total + torch.where(valid, bce, 0.0).sum()
        if reduction == "mean":
            total = total / valid.sum().clamp(min=1)
        return cfg.confidence_loss_weight / len(cfg.exits) * total

    def _distill_options(self, n_layers: int, layers: List[int]) -> dict:
        """The exits to compute and the fused loss's distillation arguments: the final layer
        is the teacher, as one of the weighted heads or as an extra exit (its index last)."""
        if not self.config.distill_weight or layers == [n_layers]:
            return dict(layers=layers)
        opts = dict(distill_weight=self.config.distill_weight, distill_temperature=self.config.distill_temperature)
        if n_layers in layers:
            return dict(opts, layers=layers, teacher=layers.index(n_layers))
        return dict(opts, layers=layers + [n_layers])

    def _loss_from_logits(self, logits: Sequence[torch.Tensor], y: torch.Tensor, reduction: str) -> torch.Tensor:
        if not isinstance(logits, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in logits):
            raise TypeError("compute_loss needs an EarlyExitTransformer or a model whose forward "
                            f"returns a list of per-layer logits, got {type(logits).__name__}")
        self._check_vocab(logits[0].shape[-1])
        weights = self.layer_weights(len(logits))
        terms = [w * F.cross_entropy(logits[i - 1].reshape(-1, self.vocab_size), y.reshape(-1), reduction=reduction)
                 for i, w in weights.items() if w > 0]
        return torch.stack(terms).sum()

    def _check_vocab(self, model_vocab: int) -> None:
        if model_vocab != self.vocab_size:
            raise ValueError(f"vocab_size={self.vocab_size} does not match the model's {model_vocab}")

    # ------------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module, base_lr: float, **adamw_kwargs) -> torch.optim.AdamW:
        """AdamW whose param groups carry ``base_lr * layer_lr_scales[i]`` for block i.

        Parameters outside the blocks (embeddings, exit norms, head, confidence heads) keep
        ``base_lr``. Matrices get weight decay, vectors (norm gains, biases) do not. Each group
        records ``initial_lr`` so a scheduler multiplying every group by one factor keeps the
        layer ratios. Given what ``distributed.wrap`` returned, the groups hold the parameters
        of the model inside it (FSDP2 shards: build the optimizer after wrapping). With
        confidence "learned" the model first gets its confidence heads
        (``add_confidence_heads``), so that the optimizer holds them.
        """
        self.add_confidence_heads(model)
        model = distributed.unwrap(model)
        if not isinstance(base_lr, (int, float)) or not math.isfinite(base_lr) or base_lr <= 0:
            raise ValueError(f"base_lr must be a finite number > 0, got {base_lr!r}")
        blocks = getattr(model, "blocks", None)
        if blocks is None and self.config.layer_lr_scales:
            raise ValueError("layer_lr_scales needs a model with a `blocks` ModuleList")
        n_layers = len(blocks) if blocks is not None else 0
        if n_layers:
            self.config.validate_for(n_layers)
        weight_decay = adamw_kwargs.pop("weight_decay", TrainConfig.weight_decay)
        groups, seen = [], set()
        for layer, module in [(i + 1, b) for i, b in enumerate(blocks or [])] + [(0, model)]:
            lr = base_lr * (self.config.lr_scale(layer) if layer else 1.0)
            groups += self._param_groups(module, layer, lr, weight_decay, seen)
        if not {"fused", "foreach", "differentiable"} & adamw_kwargs.keys():
            # One kernel per parameter tensor instead of a dozen foreach passes: AdamW's update
            # is a fixed cost of every step (a third of layer dropout's saving on the CPU bench).
            adamw_kwargs["fused"] = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                        for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=base_lr, **adamw_kwargs)

    def add_confidence_heads(self, model: nn.Module) -> nn.Module:
        """With confidence "learned": give ``model`` a confidence head at every exit that lacks
        one (``model.add_confidence_heads``, zero-initialised); otherwise leave it unchanged.
        Call it before building an optimizer (``create_optimizer`` does), before loading a
        checkpoint of such a run, and before ``distributed.wrap``. Returns ``model``."""
        layers = self.config.confidence_head_layers
        inner = distributed.unwrap(model)
        heads = getattr(inner, "confidence_heads", {})
        if not layers or all(str(i) in heads for i in layers):
            return model
        if inner is not model or not hasattr(inner, "add_confidence_heads"):
            raise ValueError(f"confidence='learned' needs confidence heads at the exits {layers}: add them before "
                             f"distributed.wrap, on a model with add_confidence_heads (EarlyExitTransformer, "
                             f"from_hf), got {type(inner).__name__}")
        inner.add_confidence_heads(layers)
        return model

    @staticmethod
    def _param_groups(module: nn.Module, layer: int, lr: float, weight_decay: float, seen: set) -> List[dict]:
        params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [dict(params=ps, lr=lr, initial_lr=lr, weight_decay=wd, layer=layer)
                for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]

    # ---------------------------------------------------------------------------- train
    def fit(self, model: nn.Module, train_batches: Iterable[Batch], steps: int, base_lr: float = 1e-3, *,
            warmup_steps: int = 0, min_lr_ratio: float = TrainConfig.min_lr_ratio,
            grad_clip: Optional[float] = TrainConfig.grad_clip,
            val_batches: Optional[Sequence[Batch]] = None, eval_every: int = 0, start_step: int = 0,
            optimizer: Optional[torch.optim.Optimizer] = None, progress_bar: bool = True,
            callback: Optional[Callable[["UniversalTrainer", dict], None]] = None,
            early_stopping: Optional[EarlyStopping] = None, **adamw_kwargs) -> List[dict]:
        """Train for ``steps`` optimizer steps (continuing at ``start_step`` when resuming).

        ``train_batches`` yields (x, y) int64 (B, T). Each step sets ``progress = step / steps``
        (which drives the alpha schedule), the LR factor of ``lr_factor``, clips gradients, and
        calls ``callback(trainer, record)``. Returns one record per step (with eval results on
        eval steps). Under DDP / FSDP2 (``model`` from ``distributed.wrap``) ``train_batches``
        yields this rank's rows; every rank runs ``fit``, and the records are the same on all:
        the loss is the global batch's, tokens/s counts every rank's tokens.
        ``early_stopping`` sees every periodic evaluation; when it says stop, that step's record
        gets ``early_stop`` (best_step, best_val_ppl), the callback runs, and fit returns with
        ``self.step`` at that step (the LR schedule kept spanning ``steps`` until then).
        """
        self._check_fit_args(steps, start_step, warmup_steps, eval_every, val_batches)
        self.total_steps, self.optimizer = steps, optimizer or self.create_optimizer(model, base_lr, **adamw_kwargs)
        model.to(self.device).train()
        batches, history = iter(train_batches), []
        bar = tqdm(range(start_step, steps), initial=start_step, total=steps, disable=not progress_bar,
                   desc="train", dynamic_ncols=True)
        for self.step in bar:
            record = self._train_step(model, next(batches), warmup_steps, min_lr_ratio, grad_clip)
            if eval_every and val_batches and (self.step + 1) % eval_every == 0:
                record["eval"] = self.evaluate(model, val_batches)
                model.train()
                if early_stopping is not None and early_stopping.update(record["step"], record["eval"]["ppl"]):
                    record["early_stop"] = early_stopping.summary()
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            history.append(record)
            if callback is not None:
                callback(self, record)
            if "early_stop" in record:
                bar.close()
                self.step = record["step"]
                return history
        self.step = steps
        return history

    def _train_step(self, model, batch: Batch, warmup_steps, min_lr_ratio, grad_clip) -> dict:
        t0 = time.perf_counter()
        factor = lr_factor(self.step, self.total_steps, warmup_steps, min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        x, y = batch
        with self.autocast():
            loss = self.compute_loss(model, x, y, self._step_drops(model, x.shape[0]))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = distributed.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
        self.optimizer.step()
        loss = distributed.mean_over_ranks(loss.detach())  # each rank's loss is its share times world_size
        scalars = [loss] + ([] if grad_norm is None else [grad_norm.to(loss.dtype)])
        loss_value, *norm = torch.stack(scalars).tolist()  # one sync per step, for the bar and the log
        return dict(step=self.step + 1, loss=loss_value, lr=self.optimizer.param_groups[0]["lr"],
                    progress=self.progress, grad_norm=norm[0] if norm else None,
                    tokens_per_s=x.numel() * distributed.world_size() / (time.perf_counter() - t0))

    def _step_drops(self, model: nn.Module, batch_size: int):
        if self.config.layer_dropout is None:
            return None
        inner = distributed.unwrap(model)
        if not hasattr(inner, "exit_hidden_states"):
            raise TypeError("layer_dropout needs a model with exit_hidden_states (EarlyExitTransformer, from_hf), "
                            f"got {type(inner).__name__}")
        return self.layer_drops(inner.n_layers, batch_size, across_ranks=distributed.is_wrapped(model))

    @staticmethod
    def _check_fit_args(steps, start_step, warmup_steps, eval_every, val_batches) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step must be in [0, steps={steps}], got {start_step!r}")
        if not 0 <= warmup_steps <= steps:
            raise ValueError(f"warmup_steps must be in [0, steps={steps}], got {warmup_steps!r}")
        if eval_every < 0 or (eval_every and not val_batches):
            raise ValueError(f"eval_every={eval_every!r} needs eval_every >= 0 and non-empty val_batches")

    # ------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, model: nn.Module, val_batches: Sequence[Batch], mode: str = "exact", *,
                 routing_threshold: Optional[routing.Thresholds] = None, per_layer: Optional[bool] = None,
                 compare_exact: bool = False, ignore_index: int = -100,
                 confidence: Optional[str] = None, exit_layers: Optional[Sequence[int]] = None) -> Dict[str, float]:
        """Routed metrics over ``val_batches`` ((x, y) int64 (B, T) pairs), docs/design.md §3.

        Returns ``ppl``, ``acc``, ``nll``, ``shallow_ratio`` (the share of tokens leaving at any
        exit), ``exit_ratio_L{i}`` for every exit i (the share leaving there), ``compute_cost``
        (mean layers run / n_layers), ``tokens_per_s`` and ``seconds``
        (of the timed pass), ``n_tokens``; with ``per_layer`` also ``ppl_L{i}`` / ``acc_L{i}`` of
        every layer's exit.
        - ``mode='exact'``: one pass through every layer; per_layer (default on) scores every
          layer's exit in that same pass (one head pass per layer, timed with it).
        - ``mode='compact'``: only the compact routed forward runs (the fast path). per_layer
          (default off) costs an extra, untimed exact pass; ``compare_exact=True`` times an exact
          routed pass batch by batch, interleaved, and adds ``ppl_exact``, ``ppl_diff_vs_exact``
          and ``speedup_vs_exact``.
        ``routing_threshold``: None = the config's per-exit thresholds; one number overrides the
        threshold of every exit (a list: one per exit) (``routing.resolve_routing``);
        ``confidence`` None = the config's (learned: the model needs confidence heads);
        ``exit_layers`` None = the config's exits.
        Under DDP / FSDP2 every rank calls it with the same ``val_batches``: each evaluates its
        share of them (under FSDP2 on a gathered copy of the weights) and the sums are reduced
        across ranks, so every rank returns the metrics of all batches.
        """
        self._check_eval_args(mode, val_batches, compare_exact)
        model, val_batches = distributed.evaluation_model(model), distributed.this_ranks_share(val_batches)
        rule = routing.resolve_routing(model, routing_threshold, exit_layers, self.config, confidence)
        per_layer = mode == "exact" if per_layer is None else per_layer
        rule_kwargs = dict(exit_layer=rule.exit_layers, routing_threshold=rule.routing_thresholds,
                           confidence=rule.confidence)
        exact = functools.partial(routing.exact_routed_forward, **rule_kwargs)
        compact = functools.partial(routing.compact_routed_forward, **rule_kwargs)
        was_training = model.training
        model.eval()
        with self.autocast():
            if mode == "exact":
                stats, = self._routed_stats(model, val_batches, [functools.partial(exact, all_layers=per_layer)],
                                            rule, ignore_index)
            else:
                stats = self._compact_stats(model, val_batches, compact, exact, compare_exact, rule, ignore_index)
                if per_layer:
                    layers, = self._routed_stats(model, val_batches, [functools.partial(exact, all_layers=True)],
                                                 rule, ignore_index)
                    stats.update({k: v for k, v in layers.items() if k.startswith(("ppl_L", "acc_L"))})
        model.train(was_training)
        return stats

    @staticmethod
    def _check_eval_args(mode, val_batches, compare_exact) -> None:
        if mode not in EVAL_MODES:
            raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")
        if not val_batches:
            raise ValueError("val_batches is empty")
        if compare_exact and mode != "compact":
            raise ValueError("compare_exact=True compares compact mode with exact mode: it needs mode='compact'")

    def _compact_stats(self, model, val_batches, compact, exact, compare_exact, rule,
                       ignore_index) -> Dict[str, float]:
        if not compare_exact:
            return self._routed_stats(model, val_batches, [compact], rule, ignore_index)[0]
        for routed_forward in (exact, compact) if val_batches else ():  # untimed: first calls pay for allocator growth
            routed_forward(model, val_batches[0][0].to(self.device), backend=self.backend)
        ex, stats = self._routed_stats(model, val_batches, [exact, compact], rule, ignore_index)
        stats.update(ppl_exact=ex["ppl"], ppl_diff_vs_exact=stats["ppl"] - ex["ppl"],
                     speedup_vs_exact=ex["seconds"] / stats["seconds"])
        return stats

    def _routed_stats(self, model, val_batches, forwards, rule, ignore_index) -> List[Dict[str, float]]:
        """Metrics of each routed forward over the same batches (``rule``: the routing.Routing
        it routes with). With several forwards, each batch runs all of them back to back, in
        alternating order, so that load drift on a shared machine hits their timings alike. One
        host sync at the end."""
        acc = [_EvalSums(self.device, model, rule) for _ in forwards]
        for i, (x, y) in enumerate(val_batches):
            x, y = x.to(self.device), y.to(self.device)
            for j in (range(len(forwards)) if i % 2 == 0 else reversed(range(len(forwards)))):
                t0 = _clock(self.device)
                out = forwards[j](model, x, targets=y, backend=self.backend, ignore_index=ignore_index)
                acc[j].seconds += _clock(self.device) - t0
                acc[j].add(out, y, ignore_index)
        return [a.summary() for a in acc]


class _EvalSums:
    """fp64 sums of one routed forward's metrics over batches, kept on the device."""

    def __init__(self, device, model: nn.Module, rule: "routing.Routing"):
        self.n_layers, self.exits, self.seconds = model.n_layers, list(rule.exit_layers), 0.0
        self.flops = _TokenFlops.of(model, rule.confidence)
        self.scored_exits = [e for e, t in zip(rule.exit_layers, rule.routing_thresholds) if t > 0]  # exits that are on
        # nll, correct, easy, layers_run, n, routed FLOPs, full-depth FLOPs, then the tokens leaving at each exit
        self.routed = torch.zeros(7 + len(self.exits), dtype=torch.float64, device=device)
        self.layers = torch.zeros(self.n_layers, 2, dtype=torch.float64, device=device)  # (L, [nll, correct])
        self.has_layers = False

    def add(self, out: "routing.RoutedOutput", y: torch.Tensor, ignore_index: int) -> None:
        valid, flat_y = y != ignore_index, y.reshape(-1)
        self.routed += _masked_sums(valid, out.nll, out.pred == y, out.easy, out.layers_run, valid,
                                    *self.flops.routed_and_full(out.layers_run, self.scored_exits, self.n_layers),
                                    *(out.easy & (out.layers_run == i) for i in self.exits))
        for i, s in (out.layer_stats or {}).items():  # (B*T,) rows per layer
            self.has_layers = True
            self.layers[i - 1] += _masked_sums(valid.reshape(-1), s.nll, s.pred == flat_y)

    def summary(self) -> Dict[str, float]:
        """The metrics; under DDP / FSDP2 of every rank's batches (sums over ranks, the slowest
        rank's seconds)."""
        sums = torch.cat([self.routed, self.layers.reshape(-1), self.routed.new_tensor([self.has_layers])])
        values = distributed.sum_over_ranks(sums).tolist()  # the sync
        n_routed = self.routed.numel()
        (nll, correct, easy, layers_run, n, flops, full_flops), left = values[:7], values[7:n_routed]
        has_layers = values[-1] > 0
        layers = [values[n_routed + 2 * i:n_routed + 2 + 2 * i] for i in range(self.n_layers)]  # (L, [nll, correct])
        seconds = distributed.max_over_ranks(self.seconds, self.routed.device)
        if n == 0:
            raise ValueError("val_batches has no scored tokens (all targets are ignore_index)")
        out = dict(ppl=math.exp(nll / n), nll=nll / n, acc=correct / n, shallow_ratio=easy / n,
                   compute_cost=layers_run / (n * self.n_layers), flop_cost=flops / full_flops,
                   tokens_per_s=n / seconds,
                   seconds=seconds, n_tokens=int(n))
        out.update({f"exit_ratio_L{i}": count / n for i, count in zip(self.exits, left)})
        for i, (layer_nll, layer_correct) in enumerate(layers if has_layers else [], start=1):
            out.update({f"ppl_L{i}": math.exp(layer_nll / n), f"acc_L{i}": layer_correct / n})
        return out


class _TokenFlops(NamedTuple):
    """Forward matmul FLOPs per token of a model's parts, for ``flop_cost``: a block's weight
    GEMMs (2 x its matrices' parameters), attention per key attended (4 d: scores and values),
    the shared head (2 d V) and a learned confidence head (2 d), or 0 for max_prob and margin,
    which score with a head pass at every exit reached; a learned score needs the head pass
    only where the token leaves."""
    block: float
    attention_per_key: float
    head: float
    confidence_head: float

    @classmethod
    def of(cls, model: nn.Module, confidence: str) -> "_TokenFlops":
        vocab, d = model.lm_head.weight.shape
        block = 2 * sum(p.numel() for p in model.blocks[0].parameters() if p.dim() == 2)
        return cls(float(block), 4.0 * d, 2.0 * d * vocab, 2.0 * d if confidence == "learned" else 0.0)

    def routed_and_full(self, layers_run: torch.Tensor, exits: Sequence[int], n_layers: int):
        """(B, T) FLOPs of each token as routed (the blocks up to its exit layer, the scores at
        each of ``exits``, the exits that are on, that it reaches, and its head passes) and at
        full depth (every block, the final head); the token at position t attends to t + 1 keys."""
        keys = torch.arange(1, layers_run.shape[-1] + 1, device=layers_run.device, dtype=torch.float64)
        per_block = self.block + self.attention_per_key * keys  # (T,)
        reached = sum(((layers_run >= e) & (e < n_layers)).double() for e in exits)  # up to the one it left at
        if self.confidence_head:  # a learned score at each exit reached, one head pass where the token stops
            heads = reached * self.confidence_head + self.head
        else:  # a head pass to score each exit reached, and the final head for tokens that run to the end
            heads = reached * self.head + (layers_run == n_layers).double() * self.head
        return layers_run.double() * per_block + heads, (n_layers * per_block + self.head).expand(layers_run.shape)


def _masked_sums(valid: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
    """fp64 sum of each (B, T) value over the scored tokens, left on the device (a masked sum:
    boolean indexing would ask the host for the count)."""
    return torch.stack([torch.where(valid, v.double(), 0.0).sum() for v in values])


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
