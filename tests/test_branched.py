import pytest
import torch

from kdlib.branched import BranchedModel, BranchSpec, attention_bias


def _bert_states(encoder, batch, depth):
    out = encoder(**batch, output_hidden_states=True)
    return out.hidden_states[depth]  # (B, T, H) after `depth` layers


def test_trunk_and_branch_reproduce_the_encoder(tiny_encoder, tiny_batch):
    """Trunk to depth d, then a branch holding layers d..N-1, computes exactly BERT's last hidden state."""
    specs = [BranchSpec("a", "classification", 3, depth=1, layers=3)]
    model = BranchedModel.from_encoder(tiny_encoder, specs).eval()
    with torch.no_grad():
        h = model.trunk_states(tiny_batch["input_ids"], tiny_batch["attention_mask"], tiny_batch["token_type_ids"], 1)
        torch.testing.assert_close(h, _bert_states(tiny_encoder, tiny_batch, 1), atol=1e-6, rtol=0)
        for layer in model.branches["a"].layers:
            h = layer(h, attention_mask=attention_bias(tiny_batch["attention_mask"]))
        ref = tiny_encoder(**tiny_batch).last_hidden_state
        keep = tiny_batch["attention_mask"].bool()
        torch.testing.assert_close(h[keep], ref[keep], atol=1e-5, rtol=0)


def test_forward_runs_trunk_once_to_the_deepest_branch(tiny_encoder, tiny_batch):
    specs = [BranchSpec("shallow", "classification", 2, depth=1, layers=1),
             BranchSpec("deep", "regression", 1, depth=3, layers=1)]
    model = BranchedModel.from_encoder(tiny_encoder, specs).eval()
    assert model.trunk_depth == 3 and len(model.trunk) == 3
    calls = []
    for i, layer in enumerate(model.trunk):
        layer.register_forward_hook(lambda *a, i=i: calls.append(i))
    with torch.no_grad():
        out = model(**tiny_batch)
    assert calls == [0, 1, 2]
    assert out["shallow"].shape == (4, 2) and out["deep"].shape == (4, 1)
    calls.clear()
    with torch.no_grad():
        only = model(**tiny_batch, names=["shallow"])
    assert calls == [0] and list(only) == ["shallow"]  # only as deep as the requested branch
    torch.testing.assert_close(only["shallow"], out["shallow"])


def test_padding_does_not_change_outputs(tiny_encoder, tiny_batch):
    model = BranchedModel.from_encoder(tiny_encoder, [BranchSpec("a", "classification", 2, 2, 2)]).eval()
    with torch.no_grad():
        full = model(**tiny_batch)["a"][3]
        unpadded = {k: v[3:4, :4] for k, v in tiny_batch.items()}
        short = model(**unpadded)["a"][0]
    assert attention_bias(unpadded["attention_mask"]) is None  # the unmasked kernel, checked against the masked one
    assert attention_bias(tiny_batch["attention_mask"]) is not None
    torch.testing.assert_close(full, short, atol=1e-5, rtol=0)


def test_bad_layouts_are_refused(tiny_encoder):
    with pytest.raises(ValueError, match="does not fit"):
        BranchedModel(tiny_encoder.config, [BranchSpec("a", "classification", 2, depth=3, layers=2)])
    with pytest.raises(ValueError, match="repeat"):
        BranchedModel(tiny_encoder.config, [BranchSpec("a", "classification", 2, 1, 1)] * 2)
    model = BranchedModel(tiny_encoder.config, [BranchSpec("a", "classification", 2, 1, 1)])
    with pytest.raises(KeyError, match="unknown branches"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), names=["b"])


def test_freeze_trunk_leaves_only_branches_trainable(tiny_encoder):
    model = BranchedModel.from_encoder(tiny_encoder, [BranchSpec("a", "classification", 2, 2, 1)])
    model.freeze_trunk()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"branches"}
