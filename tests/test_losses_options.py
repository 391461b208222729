"""The loss options of issue 13 against sentence-transformers' MultipleNegativesRankingLoss and by hand."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from denselm import losses

DIRECTION_SETS = [
    ("query_to_doc",),
    ("query_to_doc", "query_to_query"),
    ("query_to_doc", "doc_to_query"),
    ("query_to_doc", "doc_to_doc"),
    ("query_to_doc", "query_to_query", "doc_to_query"),
    ("query_to_doc", "query_to_query", "doc_to_doc"),
    ("query_to_doc", "doc_to_query", "doc_to_doc"),
    ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
]


def _embeddings(B=4, G=3, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(B * G, D, generator=g, dtype=torch.float64), dim=-1)
    return q, p


def _st_loss(q, p, G, temperature, **kwargs):
    """sentence-transformers' loss on the same embeddings: columns [anchor, positive, negative_1, ...]."""
    st = pytest.importorskip("sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking")
    loss = st.MultipleNegativesRankingLoss(model=None, scale=1.0 / temperature, **kwargs)
    columns = [q] + [p[k::G] for k in range(G)]
    return loss.compute_loss_from_embeddings(columns, None)


@pytest.mark.parametrize("directions", DIRECTION_SETS)
@pytest.mark.parametrize("partition_mode", ["joint", "per_direction"])
@pytest.mark.parametrize("G", [1, 3])
def test_extended_infonce_equals_sentence_transformers(directions, partition_mode, G):
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        with pytest.raises(ValueError, match="per_direction"):
            losses.extended_contrastive_loss(*_embeddings(G=G), G, directions=directions, partition_mode=partition_mode)
        return
    q, p = _embeddings(G=G)
    ours = losses.extended_contrastive_loss(q, p, G, 0.05, directions=directions, partition_mode=partition_mode).loss
    theirs = _st_loss(q, p, G, 0.05, directions=directions, partition_mode=partition_mode)
    assert abs(float(ours) - float(theirs)) <= 1e-6 * max(1.0, abs(float(theirs)))


@pytest.mark.parametrize("mode", losses.HARDNESS_MODES)
@pytest.mark.parametrize("directions", [("query_to_doc",), DIRECTION_SETS[-1]])
def test_hardness_weighting_equals_sentence_transformers(mode, directions):
    q, p = _embeddings(B=5, G=3, seed=3)
    ours = losses.extended_contrastive_loss(q, p, 3, 0.05, directions=directions, hardness_mode=mode,
                                            hardness_strength=9.0).loss
    theirs = _st_loss(q, p, 3, 0.05, directions=directions, hardness_mode=mode, hardness_strength=9.0)
    assert abs(float(ours) - float(theirs)) <= 1e-6 * abs(float(theirs))
    plain = losses.extended_contrastive_loss(q, p, 3, 0.05, directions=directions).loss
    assert abs(float(ours) - float(plain)) > 1e-3  # the option does something


def test_hardness_weights_are_detached_exp_alpha_s():
    """By hand: loss = log(e^{s+/t} + sum_j e^{alpha sg(s_j)} e^{s_j/t}) - s+/t, gradient through s/t only."""
    s = torch.tensor([[0.9, 0.5, -0.2]], dtype=torch.float64, requires_grad=True)
    q = torch.eye(3, dtype=torch.float64)[:1]
    # p rows chosen so q @ p.T == s
    p = torch.zeros(3, 3, dtype=torch.float64)
    p[:, 0] = s.detach()[0]
    p.requires_grad_(True)
    t, alpha = 0.1, 2.0
    res = losses.extended_contrastive_loss(q, p, 3, t, hardness_mode="hard_negatives", hardness_strength=alpha)
    sv = s.detach()[0]
    expected = math.log(math.exp(sv[0] / t) + sum(math.exp(alpha * sv[j]) * math.exp(sv[j] / t) for j in (1, 2))) - sv[0] / t
    assert abs(float(res.loss.detach()) - expected) < 1e-12
    res.loss.backward()
    w = torch.tensor([math.exp(sv[0] / t)] + [math.exp((alpha + 1 / t) * sv[j]) for j in (1, 2)], dtype=torch.float64)
    softmax = w / w.sum()
    expected_grad = softmax / t
    expected_grad[0] -= 1 / t
    torch.testing.assert_close(p.grad[:, 0], expected_grad)


def test_default_options_equal_seed_loss():
    q, p = _embeddings(B=3, G=4, seed=5)
    res = losses.extended_contrastive_loss(q, p, 4, 0.02)
    scores = losses.similarity(q, p) / 0.02
    torch.testing.assert_close(res.loss, losses.in_batch_contrastive_loss(scores, 4))
    torch.testing.assert_close(res.scores, scores)


def test_margin_mask_by_hand():
    # query 0: positive 0.5; passages 0.7 (> 0.5 + 0.1: masked), 0.55 (kept), 0.6 (== 0.6: kept)
    sims = torch.tensor([[0.5, 0.7, 0.55, 0.6]])
    mask = losses.margin_mask(sims, sims[:, 0], 0.1)
    assert mask.tolist() == [[False, True, False, False]]
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[0.5, 0.0], [0.7, 0.0], [0.55, 0.0], [0.6, 0.0]], dtype=torch.float64)
    res = losses.extended_contrastive_loss(q, p, 4, 0.1, margin=0.1)
    kept = torch.tensor([[0.5, 0.55, 0.6]], dtype=torch.float64) / 0.1
    torch.testing.assert_close(res.loss, F.cross_entropy(kept, torch.tensor([0])))
    assert res.masks["margin"].tolist() == [[False, True, False, False]]
    assert losses.masked_fraction(res.masks["margin"], torch.tensor([0])) == pytest.approx(1 / 3)


def test_margin_never_masks_positive_and_has_no_gradient():
    q, p = _embeddings(B=3, G=2, seed=7)
    p = p.clone().requires_grad_(True)
    res = losses.extended_contrastive_loss(q, p, 2, 0.05, margin=-10.0)  # masks every negative
    assert not res.masks["margin"][torch.arange(3), torch.arange(3) * 2].any()
    assert abs(float(res.loss)) < 1e-12  # only the positive left in each row
    res.loss.backward()
    assert p.grad.abs().max() < 1e-12


def test_masks_compose_and_apply_to_extra_terms():
    """A masked passage leaves every term; a query whose positive is masked leaves the query terms."""
    q, p = _embeddings(B=3, G=2, seed=9)
    dup = torch.zeros(3, 6, dtype=torch.bool)
    dup[0, 2] = True  # query 1's positive is a duplicate of query 0's
    dirs = DIRECTION_SETS[-1]
    res = losses.extended_contrastive_loss(q, p, 2, 0.05, masks={"same_document": dup}, directions=dirs)
    # By hand: drop column 2 from q2d and d2d rows of query 0, and query 1 from its q2q and d2q.
    raw = q @ p.T
    t = 0.05
    terms = []
    for i in range(3):
        keep_p = [j for j in range(6) if not (i == 0 and j == 2)]
        keep_q = [k for k in range(3) if not (i == 0 and k == 1)]
        qd = [raw[i, j] for j in keep_p]
        qq = [q[i] @ q[k] for k in keep_q if k != i]
        dq = [q[k] @ p[2 * i] for k in keep_q]
        dd = [p[2 * i] @ p[j] for j in keep_p if j // 2 != i]
        logz = torch.logsumexp(torch.stack(qd + qq + dq + dd) / t, 0)
        terms.append(logz - raw[i, 2 * i] / t)
    torch.testing.assert_close(res.loss, torch.stack(terms).mean())
    assert res.masks["same_document"].sum() == 1


def test_teacher_margin_mask_on_teacher_scale():
    teacher = torch.tensor([[3.0, 3.5, 2.0], [1.0, 0.0, 1.05]])
    mask = losses.teacher_margin_mask(teacher, 0.2, num_columns=12, query_offset=2)
    expected = torch.zeros(2, 12, dtype=torch.bool)
    expected[0, 7] = True  # query 2 (global), column 2*3 + 1
    torch.testing.assert_close(mask, expected)
    # query 1 on one process: 1.05 > 1.0 + 0.01 -> column 1*3 + 2 masked
    assert losses.teacher_margin_mask(teacher, 0.01, 6).nonzero().tolist() == [[0, 1], [1, 5]]


def test_bad_options():
    q, p = _embeddings()
    with pytest.raises(ValueError, match="query_to_doc"):
        losses.extended_contrastive_loss(q, p, 3, directions=("query_to_query",))
    with pytest.raises(ValueError, match="hardness_mode"):
        losses.extended_contrastive_loss(q, p, 3, hardness_mode="hard")
    with pytest.raises(ValueError, match="mask 'x'"):
        losses.extended_contrastive_loss(q, p, 3, masks={"x": torch.zeros(2, 2, dtype=torch.bool)})


@pytest.mark.parametrize("override,key", [
    ("--loss.margin=-0.1", "loss.margin"),
    ("--loss.directions=[query_to_query]", "loss.directions"),
    ("--loss.directions=[query_to_doc,doc_to_dog]", "loss.directions"),
    ("--loss.partition_mode=mean", "loss.partition_mode"),
    ("--loss.hardness_mode=hardest", "loss.hardness_mode"),
    ("--loss.hardness_strength=-1", "loss.hardness_strength"),
])
def test_config_errors_name_the_key(override, key):
    from denselm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_config_builds_loss_options():
    from denselm.config import load_config

    cfg = load_config(None, ["--loss.margin=0.1", "--loss.directions=[query_to_doc,doc_to_query]",
                             "--loss.partition_mode=per_direction", "--loss.hardness_mode=in_batch_negatives",
                             "--loss.hardness_strength=9"])
    opts = cfg.loss.options()
    assert opts == losses.LossOptions(0.1, None, ("query_to_doc", "doc_to_query"), "per_direction",
                                      "in_batch_negatives", 9.0)
    assert load_config(None, []).loss.options().is_default
