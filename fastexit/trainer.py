"""UniversalTrainer: trains any method expressible as per-layer loss weights (docs/design.md §2),
and evaluates it with its routing rule through ``fastexit.evaluate`` (§3)."""
import contextlib
import math
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed, evaluate, routing
from .config import TrainConfig, UniversalConfig
from .evaluate import Batch
from .kernels import exit_confidence, resolve_backend, weighted_linear_cross_entropy
from .protocol import is_early_exit, missing_parts, require_early_exit


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
        if not is_early_exit(model):  # the seed's style: forward returns every layer's logits
            loss = self._loss_from_logits(model, x, y, reduction)
        else:
            states = model.exit_hidden_states(x, self.loss_layers(model), drops=drops)
            loss = self.loss_from_states(model, states, y, reduction)
        return distributed.global_token_mean(loss, y) if across_ranks else loss

    def loss_layers(self, model: nn.Module) -> List[int]:
        """The layers whose exit-normed states ``loss_from_states`` reads, in its order: the
        weighted layers (the final one added last as the distillation teacher where it is not
        weighted), then the exits whose learned confidence heads train (and their labels'
        layer). Checks the model against the method first."""
        self._check_vocab(model.lm_head.weight.shape[0])
        distributed.check_unsharded(model.lm_head.weight)
        weights = self.layer_weights(model.n_layers)
        scored = self._distill_options(model.n_layers, [i for i, w in weights.items() if w > 0])["layers"]
        return scored + [i for i in self._confidence_layers(model) if i not in scored]  # one pass for both

    def loss_from_states(self, model: nn.Module, states: Sequence[torch.Tensor], y: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
        """The weighted loss from the exit-normed states (B, T, d) of ``loss_layers(model)``, in
        that order: the fused weighted cross-entropy of y (B, T) int64 (ignore_index -100), plus
        self-distillation and the confidence heads' loss where the method has them. reduction
        'mean' (over scored tokens) or 'sum'."""
        weights = self.layer_weights(model.n_layers)
        layers = [i for i, w in weights.items() if w > 0]
        distill = self._distill_options(model.n_layers, layers)
        scored, learned = distill.pop("layers"), self._confidence_layers(model)
        run = scored + [i for i in learned if i not in scored]
        states = [h.reshape(-1, h.shape[-1]) for h in states]
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
        return loss

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

    def _loss_from_logits(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
        logits = model(x)
        if not isinstance(logits, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in logits):
            raise TypeError(f"compute_loss needs an early-exit model or a model whose forward returns a list of "
                            f"per-layer logits; {type(model).__name__} returned {type(logits).__name__} and lacks "
                            f"{', '.join(missing_parts(model))}")
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
        if inner is not model:
            raise ValueError(f"confidence='learned' needs confidence heads at the exits {layers}: add them before "
                             f"distributed.wrap")
        if not is_early_exit(model):
            raise ValueError(f"confidence='learned' needs confidence heads at the exits {layers}, on an early-exit "
                             f"model; {type(model).__name__} lacks {', '.join(missing_parts(model))}")
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
        grad_norm = self._clip_gradients(model, grad_clip) if grad_clip else None
        self.optimizer.step()
        loss = distributed.mean_over_ranks(loss.detach())  # each rank's loss is its share times world_size
        scalars = [loss] + ([] if grad_norm is None else [grad_norm.to(loss.dtype)])
        loss_value, *norm = torch.stack(scalars).tolist()  # one sync per step, for the bar and the log
        return dict(step=self.step + 1, loss=loss_value, lr=self.optimizer.param_groups[0]["lr"],
                    progress=self.progress, grad_norm=norm[0] if norm else None,
                    tokens_per_s=x.numel() * distributed.world_size() / (time.perf_counter() - t0))

    def _clip_gradients(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradient's global norm to ``max_norm``; returns the LM's norm. Confidence heads
        that the backbone's gradient does not reach (confidence_backbone_grad False) are a model
        of their own, clipped on their own: in one global norm, their BCE gradient would shrink
        the LM's steps, so training heads would change the LM."""
        heads = getattr(distributed.unwrap(model), "confidence_heads", None)
        if heads is None or self.config.confidence_backbone_grad:
            return distributed.clip_grad_norm_(model.parameters(), max_norm)
        head_params = list(heads.parameters())
        ids = {id(p) for p in head_params}
        distributed.clip_grad_norm_(head_params, max_norm)
        return distributed.clip_grad_norm_([p for p in model.parameters() if id(p) not in ids], max_norm)

    def _step_drops(self, model: nn.Module, batch_size: int):
        if self.config.layer_dropout is None:
            return None
        inner = distributed.unwrap(model)
        require_early_exit(inner, "model (for layer_dropout, which runs its blocks row by row)")
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
    def evaluate(self, model: nn.Module, val_batches: Sequence[Batch], mode: str = "exact", *,
                 routing_threshold: Optional[routing.Thresholds] = None, per_layer: Optional[bool] = None,
                 compare_exact: bool = False, ignore_index: int = -100,
                 confidence: Optional[str] = None, exit_layers: Optional[Sequence[int]] = None) -> Dict[str, float]:
        """Routed metrics over ``val_batches`` ((x, y) int64 (B, T) pairs) with this trainer's
        method, device, backend and ``autocast()``: ``fastexit.evaluate.evaluate``, whose
        docstring lists the metrics, ``mode`` 'exact' | 'compact', ``per_layer`` and
        ``compare_exact`` (docs/design.md §3).

        ``routing_threshold``: None = the config's per-exit thresholds; one number overrides the
        threshold of every exit (a list: one per exit) (``routing.resolve_routing``);
        ``confidence`` None = the config's (learned: the model needs confidence heads);
        ``exit_layers`` None = the config's exits.
        Under DDP / FSDP2 every rank calls it with the same ``val_batches``: each evaluates its
        share of them (under FSDP2 on a gathered copy of the weights) and the sums are reduced
        across ranks, so every rank returns the metrics of all batches.
        """
        return evaluate.evaluate(model, val_batches, mode, config=self.config, device=self.device,
                                 backend=self.backend, autocast=self.autocast(), routing_threshold=routing_threshold,
                                 per_layer=per_layer, compare_exact=compare_exact, ignore_index=ignore_index,
                                 confidence=confidence, exit_layers=exit_layers)
