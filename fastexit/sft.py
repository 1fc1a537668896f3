"""TRL's ``SFTTrainer`` training fastexit's early-exit loss (docs/design.md §8).

TRL 1.x's ``SFTTrainer`` does not call the model's loss: it patches the model with its own
fused head on the final layer (``trl.trainer.utils.add_fused_lm_head``) and scores the
log-probabilities that head returns, so a loss computed in the model's forward never reaches
it. ``EarlyExitSFTTrainer`` is ``SFTTrainer`` (its data preparation, collator, packing,
PEFT and logging) with transformers' ``Trainer.compute_loss``: the model's own forward with the
labels, which ``apply_early_exit`` makes the fused weighted early-exit loss:

    model = apply_early_exit(AutoModelForCausalLM.from_pretrained(path), "asymmetric_best")
    EarlyExitSFTTrainer(model=model, args=SFTConfig(...), train_dataset=data).train()

TRL's token-accuracy and entropy metrics come from its final-layer head and are not logged.
Needs ``trl`` (``pip install trl``, or the ``trl`` extra), which this module imports.
"""
import transformers  # optional dependency: the hf extra
import trl  # optional dependency: the trl extra

__all__ = ["EarlyExitSFTTrainer"]


class EarlyExitSFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` for a model that ``fastexit.hf.apply_early_exit`` prepared; every
    argument is SFTTrainer's. The loss is the model's (``Trainer.compute_loss``: labels and
    ``num_items_in_batch`` go to its forward), never TRL's final-layer head."""

    def __init__(self, model=None, *args, **kwargs):
        if not hasattr(model, "_fastexit"):
            raise ValueError("model: give EarlyExitSFTTrainer a transformers model prepared with "
                             "fastexit.hf.apply_early_exit(model, method) (a model name or an unprepared model "
                             "would train TRL's final-layer loss)")
        super().__init__(model, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return transformers.Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                                 num_items_in_batch=num_items_in_batch)
