import numpy as np
import torch
from torch_geometric.nn import GCNConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from mmtalker.nn.gcn import (
    GraphConvolution,
    MeshEncoder,
    cluster_mean,
    coarse_edges,
    farthest_point_clusters,
    mesh_edges,
    normalized_adjacency,
    pooling_matrix,
)


def test_graph_convolution_matches_torch_geometric_gcnconv(small_face: tuple) -> None:
    _, topology = small_face
    edges = mesh_edges(topology.faces)
    torch.manual_seed(0)
    reference = GCNConv(8, 8)
    torch.nn.init.normal_(reference.bias)
    ours = GraphConvolution(8)
    ours.load_state_dict(reference.state_dict())
    adjacency = MeshEncoder(topology.faces, topology.uv, 8, (40,), blocks=1).adjacency(0)
    x = torch.randn(3, topology.num_vertices, 8, requires_grad=True)
    expected = reference(x, torch.as_tensor(edges))
    got = ours(x, adjacency)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(got.square().sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_normalized_adjacency_is_torch_geometrics_gcn_norm(small_face: tuple) -> None:
    _, topology = small_face
    fine = mesh_edges(topology.faces)
    coarse = coarse_edges(fine, farthest_point_clusters(topology.uv, 40))
    for edges, nodes in ((fine, topology.num_vertices), (coarse, 40)):
        index, weight = gcn_norm(torch.as_tensor(edges), None, nodes)
        expected = torch.sparse_coo_tensor(index.flip(0), weight, (nodes, nodes)).coalesce()
        indices, values = normalized_adjacency(edges, nodes)
        torch.testing.assert_close(indices, expected.indices(), rtol=0, atol=0)
        torch.testing.assert_close(values, expected.values())


def test_mesh_encoder_trains_under_bf16_autocast(small_face: tuple) -> None:
    templates, topology = small_face
    encoder = MeshEncoder(topology.faces, topology.uv, 16, (40, 10), blocks=1)
    faces = torch.as_tensor(np.stack(list(templates.values()))) * 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = encoder(faces)
    assert tokens.shape == (2, 10, 16) and torch.isfinite(tokens).all()
    # Autocast must not reach the sparse product: its backward fails on a bfloat16 operand.
    tokens.float().square().sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_cluster_mean_is_the_pooling_matrix_product(small_face: tuple) -> None:
    _, topology = small_face
    assignment = farthest_point_clusters(topology.uv, 40)
    sizes = torch.as_tensor(np.bincount(assignment, minlength=40), dtype=torch.float32)
    x = torch.randn(3, topology.num_vertices, 5)
    expected = torch.as_tensor(pooling_matrix(assignment, 40)) @ x
    torch.testing.assert_close(cluster_mean(x, torch.as_tensor(assignment), sizes), expected)


def test_a_narrow_full_mesh_level_is_widened_to_the_token_width(small_face: tuple) -> None:
    templates, topology = small_face
    torch.manual_seed(0)
    faces = torch.as_tensor(np.stack(list(templates.values()))) * 10
    encoder = MeshEncoder(topology.faces, topology.uv, 16, (40, 10), blocks=1, fine_dim=4)
    assert encoder.levels[0][0].conv1.lin.weight.shape == (4, 4)
    tokens = encoder(faces)
    assert tokens.shape == (2, 10, 16)
    tokens.square().sum().backward()
    assert encoder.input.weight.grad.abs().sum() > 0
    # Widening after the first pooling is the same map as widening on the full mesh before it.
    centred = faces
    scale = centred.norm(dim=-1).amax(dim=1)[:, None, None]
    uv = encoder.uv.expand(2, -1, -1)
    x = encoder.input(torch.cat([centred / scale, uv, centred], dim=-1))
    x = encoder.widen(encoder.levels[0][0](x, encoder.adjacency(0)))
    for level in (1, 2):
        x = cluster_mean(
            x, getattr(encoder, f"assignment_{level}"), getattr(encoder, f"cluster_size_{level}")
        )
        x = encoder.levels[level][0](x, encoder.adjacency(level))
    torch.testing.assert_close(tokens, x + encoder.token_position)
    flat = MeshEncoder(topology.faces, topology.uv, 16, (), blocks=1, fine_dim=4)
    assert flat(faces).shape == (2, topology.num_vertices, 16)
