"""apply_early_exit: a transformers causal LM whose own forward returns fastexit's weighted
early-exit loss, so that the transformers Trainer, PEFT and gradient checkpointing train it
unchanged. References: transformers' own forward (output_hidden_states) and
UniversalTrainer.compute_loss, in fp64."""
import copy
import functools

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastexit import UniversalConfig, UniversalTrainer, from_hf, get_preset  # noqa: E402
from fastexit.config import LayerDropout  # noqa: E402
from fastexit.hf import METHOD_KEY, apply_early_exit  # noqa: E402
from test_hf import FAMILIES, N_LAYERS, VOCAB, make_hf  # noqa: E402

METHODS = [get_preset("asymmetric_best", N_LAYERS, exit_layer=2), UniversalConfig({1: 0.2, 3: 0.5, 4: 0.3}),
           UniversalConfig({2: 0.6, 4: 0.4}, distill_weight=0.5, distill_temperature=2.0)]


def fp64(family):
    return make_hf(family).double().train()


def labels_with_ignored(b=3, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (b, t), generator=g)
    labels = x.clone()
    labels[0, :4] = -100  # a prompt that is not scored
    labels[2, 7:] = -100  # padding at the end
    return x, labels


def shifted(labels):
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def reference_loss(model, x, labels, weights, reduction="mean"):
    """sum_i w_i CE(head(norm(h_i))[:, :-1], labels[:, 1:]) from transformers' forward; the last
    hidden state already went through the final norm."""
    hidden = model(x, output_hidden_states=True).hidden_states
    norm, head, L = from_hf(model).exit_norms[0], model.get_output_embeddings(), len(hidden) - 1
    return sum(w * F.cross_entropy(head(hidden[i] if i == L else norm(hidden[i]))[:, :-1].flatten(0, 1),
                                   labels[:, 1:].flatten(), reduction=reduction)
               for i, w in weights.items() if w > 0)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", METHODS[:2])
def test_forward_loss_and_gradients_equal_the_transformers_formula_and_compute_loss(family, method):
    model = fp64(family)
    x, labels = labels_with_ignored()
    ref = reference_loss(model, x, labels, UniversalTrainer(method, VOCAB).layer_weights(N_LAYERS))
    ref.backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)
    ours_compute = UniversalTrainer(method, VOCAB).compute_loss(from_hf(model), x, shifted(labels))
    apply_early_exit(model, method)
    out = model(x, labels=labels)
    assert out.logits is None  # training mode: no [N, V] logits
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, ours_compute, rtol=1e-12, atol=1e-12)
    ours = grads(model)
    assert ours.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_distillation_equals_compute_loss():
    model, method = fp64("llama"), METHODS[2]
    x, labels = labels_with_ignored()
    ref = UniversalTrainer(method, VOCAB).compute_loss(from_hf(model), x, shifted(labels))
    torch.testing.assert_close(apply_early_exit(model, method)(x, labels=labels).loss, ref, rtol=1e-12, atol=1e-12)


def test_num_items_in_batch_sums_and_divides_as_transformers_does():
    model, method = fp64("llama"), METHODS[1]
    x, labels = labels_with_ignored()
    weights = UniversalTrainer(method, VOCAB).layer_weights(N_LAYERS)
    ref = reference_loss(model, x, labels, weights, reduction="sum") / 57
    apply_early_exit(model, method)
    torch.testing.assert_close(model(x, labels=labels, num_items_in_batch=torch.tensor(57)).loss, ref,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x, labels=labels, num_items_in_batch=57).loss, ref, rtol=1e-12, atol=1e-12)


def test_eval_mode_returns_the_final_logits_and_no_labels_is_the_models_own_forward():
    model = fp64("llama")
    x, labels = labels_with_ignored()
    plain = model(x).logits
    apply_early_exit(model, "lpt").eval()
    torch.testing.assert_close(model(x, labels=labels).logits, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x).logits, plain, rtol=0, atol=0)
    assert model(x, labels=labels, skip_logits=True).logits is None


def test_generate_keeps_working_and_fastexit_generation_takes_the_same_model():
    model = make_hf("llama").eval()
    x = torch.randint(1, VOCAB, (2, 5))
    before = model.generate(x, max_new_tokens=6, do_sample=False)
    apply_early_exit(model, get_preset("asymmetric_best", N_LAYERS, exit_layer=2))
    assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False), before)
    out = from_hf(model).generate(x, 6)  # full depth: greedy equals transformers'
    assert torch.equal(out.tokens, before)
    assert torch.equal(from_hf(model).generate(x, 6, exit_layer=2, speculative=2).tokens, before)


def saved_tensor_count(step) -> int:
    """How many tensors autograd saves for the backward while ``step`` runs its forward."""
    count = [0]

    def pack(t):
        count[0] += 1
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return count[0]


def test_gradient_checkpointing_gives_the_same_gradients():
    model, method = fp64("llama"), METHODS[1]
    x, labels = labels_with_ignored()
    apply_early_exit(model, method)
    plain_saved = saved_tensor_count(lambda: model(x, labels=labels).loss.backward())
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    checkpointed_saved = saved_tensor_count(lambda: model(x, labels=labels).loss.backward())
    assert checkpointed_saved < plain_saved  # the layers' activations were not kept: checkpointing is on
    checkpointed = grads(model)
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-12, atol=1e-14, msg=name)


def test_save_pretrained_and_from_pretrained_keep_the_method(tmp_path):
    model, method = make_hf("qwen2"), METHODS[2]
    apply_early_exit(model, method).save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(loaded.config, METHOD_KEY) == method.to_dict()
    apply_early_exit(loaded)  # the method comes from config.json
    assert loaded._fastexit.trainer.config == method
    x, labels = labels_with_ignored()
    torch.testing.assert_close(loaded(x, labels=labels).loss, model(x, labels=labels).loss, rtol=0, atol=0)


def test_a_deep_copy_computes_with_its_own_weights():
    model = apply_early_exit(make_hf("llama"), "lpt")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    x, labels = labels_with_ignored()
    assert twin(x, labels=labels).loss.item() != model(x, labels=labels).loss.item()
    assert twin._fastexit.view.hf is twin


def test_lora_trains_only_the_adapter_weights():
    peft = pytest.importorskip("peft")
    model = apply_early_exit(make_hf("llama"), METHODS[1])
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0, init_lora_weights=False))
    x, labels = labels_with_ignored()
    lora.train()
    out = lora(input_ids=x, labels=labels)
    out.loss.backward()
    with_grad = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    # the loss is the early-exit loss of the adapted model: merge the adapters and compare
    merged = lora.merge_and_unload()
    ref = reference_loss(merged, x, labels, UniversalTrainer(METHODS[1], VOCAB).layer_weights(N_LAYERS))
    torch.testing.assert_close(out.loss, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(method=UniversalConfig({1: 0.5, 4: 0.5}, layer_dropout=LayerDropout(0.2))), ValueError, "layer_dropout"),
    (dict(method=UniversalConfig({1: 0.5, 4: 0.5}, exit_layers=[1], confidence="learned",
                                 confidence_loss_weight=1.0)), ValueError, "confidence"),
    (dict(method={1: 1.0}), TypeError, "method"),
    (dict(method="no_such_preset"), ValueError, "preset"),
    (dict(method=UniversalConfig({9: 1.0})), ValueError, "layer_weights"),
    (dict(), ValueError, "method"),
])
def test_bad_methods_are_one_clear_error(kwargs, error, name):
    with pytest.raises(error, match=name):
        apply_early_exit(make_hf("llama"), **kwargs)


def test_unsupported_models_and_bad_labels_are_one_clear_error():
    bert = transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        is_decoder=True))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        apply_early_exit(bert, "lpt")
    model = apply_early_exit(make_hf("llama"), "lpt")
    x, labels = labels_with_ignored()
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=labels[:, :-1])
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=labels.float())


# ----------------------------------------------------------------------------- the transformers Trainer
class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=8, t=10):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randint(1, VOCAB, (n, t), generator=g)
        self.labels = self.x.clone()
        self.labels[::3, :5] = -100  # rows with different numbers of scored tokens
        self.labels[1::4, 6:] = -100

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(input_ids=self.x[i], labels=self.labels[i])


def trained_weights(tmp_path, batch, accumulation, steps=2, seen=None):
    """The weights after ``steps`` Trainer steps; ``seen`` collects the num_items_in_batch the
    Trainer passed to the model's forward."""
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = apply_early_exit(make_hf("llama"), METHODS[1])
    if seen is not None:
        forward = model.forward

        @functools.wraps(forward)  # the Trainer keeps the dataset columns the forward's signature names
        def spy(*args, **kwargs):
            seen.append(kwargs.get("num_items_in_batch"))
            return forward(*args, **kwargs)
        model.forward = spy
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"b{batch}a{accumulation}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant",
        optim="sgd", weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, seed=0, dataloader_drop_last=True)
    transformers.Trainer(model=model, args=args, train_dataset=TokenDataset()).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_trainer_step_is_sgd_on_the_loss_summed_over_tokens_and_divided_by_num_items(tmp_path):
    """One step over the whole dataset: the Trainer passes num_items_in_batch (transformers >= 5
    counts the shifted labels, 4.x the unshifted ones), and the step must be SGD on the summed
    early-exit loss divided by it (a mean per micro-batch, or a sum, would differ)."""
    seen = []
    stepped = trained_weights(tmp_path, batch=8, accumulation=1, steps=1, seen=seen)
    assert len(seen) == 1 and seen[0] is not None
    torch.manual_seed(0)
    model = apply_early_exit(make_hf("llama"), METHODS[1])
    data = TokenDataset()
    model(data.x, labels=data.labels, num_items_in_batch=seen[0]).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(stepped[name], p.detach() - 1e-2 * p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_with_gradient_accumulation_2_equals_twice_the_batch(tmp_path):
    accumulated = trained_weights(tmp_path, batch=2, accumulation=2)
    whole = trained_weights(tmp_path, batch=4, accumulation=1)
    for name, w in whole.items():
        torch.testing.assert_close(accumulated[name], w, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(0)
    untrained = make_hf("llama")
    assert any(not torch.equal(untrained.state_dict()[n], w) for n, w in whole.items())  # training moved them


def test_trl_sft_trainer_step_is_sgd_on_the_early_exit_loss(tmp_path):
    """EarlyExitSFTTrainer (TRL's SFTTrainer with the model's own loss): one SGD step over a
    pre-tokenized dataset is the step of the model's early-exit loss on the labels TRL built,
    divided by the num_items_in_batch TRL passed; a model apply_early_exit did not prepare is
    refused (TRL would train its own final-layer loss)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    from fastexit.sft import EarlyExitSFTTrainer
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1")),
        pad_token="t0", eos_token="t2")
    x = torch.randint(3, VOCAB, (8, 10), generator=torch.Generator().manual_seed(3))
    data = datasets.Dataset.from_dict({"input_ids": x.tolist()})  # equal lengths: no padding, every token scored
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=8, max_steps=1,
                         learning_rate=1e-2, lr_scheduler_type="constant", optim="sgd", report_to=[], use_cpu=True,
                         save_strategy="no", max_length=None, max_grad_norm=0.0,
                         bf16=False)  # SFTConfig's default is bf16 autocast
    seen, stepped = [], []
    for method in METHODS[:2]:
        torch.manual_seed(0)
        model = apply_early_exit(make_hf("llama"), method)
        forward = model.forward

        @functools.wraps(forward)
        def spy(*a, forward=forward, **kw):
            seen.append((kw["labels"].clone(), kw.get("num_items_in_batch")))
            return forward(*a, **kw)
        model.forward = spy
        EarlyExitSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
        stepped.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for (labels, n_items), method, after in zip(seen, METHODS[:2], stepped):
        assert sorted(labels.tolist()) == sorted(x.tolist())  # the dataset's rows, shuffled by the sampler
        assert n_items == x.numel() - len(x)  # transformers >= 5 counts the shifted labels
        torch.manual_seed(0)
        model = apply_early_exit(make_hf("llama"), method)
        model(labels, labels=labels, num_items_in_batch=n_items).loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(after[name], p.detach() - 1e-2 * p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(stepped[0]["lm_head.weight"], stepped[1]["lm_head.weight"])  # the methods differ
    with pytest.raises(ValueError, match="apply_early_exit"):
        EarlyExitSFTTrainer(model=make_hf("llama"), args=args, train_dataset=data, processing_class=tokenizer)
