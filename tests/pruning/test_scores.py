import torch
import torch.nn.functional as F

from fastmerge.pruning.scores import alignment, gaprune_score, random_score


def test_row_cosine_alignment_varies_and_sign_is_elementwise():
    dom = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    gen = torch.tensor([[1.0, 0.0], [-1.0, -1.0], [2.0, -1.0]])
    assert torch.allclose(alignment(dom, gen, "row_cosine").squeeze(1), torch.tensor([1.0, -1.0, 0.0]), atol=1e-7)
    assert torch.equal(alignment(dom, gen, "sign"), torch.tensor([[1.0, 0.0], [-1.0, -1.0], [1.0, -1.0]]))


def test_gaprune_matches_the_formula():
    theta = torch.tensor([[0.5, -0.2], [0.1, -0.9]])
    fd, fg = torch.tensor([[2.0, 0.5], [1.0, 0.1]]), torch.tensor([[1.0, 0.2], [3.0, 0.1]])
    s = torch.tensor([[1.0], [-1.0]])
    got = gaprune_score(theta, fd, fg, s, alpha=0.5, beta=1.0, gamma=0.5)
    a = theta.abs()
    want = F.softplus((fd * a - fg * a) * torch.clamp(1 + 0.5 * s, 0.8, 1.2) + 0.5 * a.sqrt())
    assert torch.allclose(got, want) and (got > 0).all()


def test_random_score_is_reproducible_per_seed_and_name():
    a = random_score("x.weight", torch.Size([4, 8]), seed=1)
    assert torch.equal(a, random_score("x.weight", torch.Size([4, 8]), seed=1))
    assert not torch.equal(a, random_score("y.weight", torch.Size([4, 8]), seed=1))
    assert ((a >= 0) & (a < 1)).all()
