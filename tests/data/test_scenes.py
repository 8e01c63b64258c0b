"""The synthetic normal scenes: geometry against depth, the convention, masks, determinism and the dataset."""
import json
import math

import numpy as np
import pytest
import torch

from kzoo.data import normals as normal_sets
from kzoo.data.scenes import SHAPES, Scene, camera_rays, panned, render, sample_scene
from kzoo.models.stablenormal import ray_directions


def _room(**overrides) -> Scene:
    """An axis-aligned room around the camera with nothing in it: back wall 4 m ahead, floor 1.5 m below."""
    scene = Scene(size=(33, 47), fov_degrees=60.0, room_rotation=torch.eye(3), room_center=torch.tensor([0.0, 0.5, 0.0]),
                  room_half=torch.tensor([3.0, 2.0, 4.0]), room_open=torch.zeros(6, dtype=torch.bool),
                  lights=torch.tensor([[0.0, 1.0, -1.0]]), light_colors=torch.ones(1, 3), sky=torch.ones(2, 3) * 0.5)
    for key, value in overrides.items():
        setattr(scene, key, value)
    return scene


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = (torch.nn.functional.normalize(a.double(), dim=-1) * torch.nn.functional.normalize(b.double(), dim=-1)).sum(-1)
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1)))


def _normals_from_depth(rendering) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals from central differences of the back-projected depth map, and where they are trustworthy:
    all four neighbours valid and on the same smooth surface as the centre (their analytic normals agree)."""
    height, width = rendering.depth.shape
    k = rendering.intrinsics.double()
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5, torch.arange(width, dtype=torch.float64) + 0.5,
                          indexing="ij")
    depth = rendering.depth.double()
    points = torch.stack([(u - k[0, 2]) / k[0, 0], -(v - k[1, 2]) / k[1, 1], -torch.ones_like(u)], -1) * depth[..., None]
    du = points[1:-1, 2:] - points[1:-1, :-2]
    dv = points[2:, 1:-1] - points[:-2, 1:-1]
    estimate = torch.linalg.cross(du, dv)
    view = -points[1:-1, 1:-1]
    estimate = torch.where((estimate * view).sum(-1, keepdim=True) < 0, -estimate, estimate)
    analytic = rendering.normal[1:-1, 1:-1].double()
    neighbours = [rendering.normal[1:-1, 2:], rendering.normal[1:-1, :-2], rendering.normal[2:, 1:-1],
                  rendering.normal[:-2, 1:-1]]
    valid = torch.stack([rendering.mask[1:-1, 2:], rendering.mask[1:-1, :-2], rendering.mask[2:, 1:-1],
                         rendering.mask[:-2, 1:-1], rendering.mask[1:-1, 1:-1]]).all(0)
    smooth = torch.stack([_angle(n, analytic) < 6.0 for n in neighbours]).all(0)
    ids = rendering.surface
    same = torch.stack([ids[1:-1, 2:], ids[1:-1, :-2], ids[2:, 1:-1], ids[:-2, 1:-1]]) == ids[1:-1, 1:-1]
    return estimate, valid & smooth & same.all(0)


def test_camera_facing_wall_is_0_0_1_and_floor_is_up():
    out = render(_room())
    height, width = out.mask.shape
    assert out.mask.all()
    centre = out.normal[height // 2, width // 2]
    torch.testing.assert_close(centre, torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.depth[height // 2, width // 2], torch.tensor(4.0), atol=1e-4, rtol=0)
    # Bottom row: the floor, whose normal is +y (up) in camera space.
    torch.testing.assert_close(out.normal[-1, width // 2], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    # The wall seen to the right (+x) faces back toward the camera, -x; the one to the left, +x.
    right = _room(room_half=torch.tensor([1.0, 2.0, 4.0]))
    side = render(right)
    torch.testing.assert_close(side.normal[height // 2, -1], torch.tensor([-1.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(side.normal[height // 2, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)


def test_sphere_normals_follow_the_opengl_convention():
    sphere = {"kind": "sphere", "center": torch.tensor([0.0, 0.0, -3.0]), "rotation": torch.eye(3), "radius": 1.0,
              "albedo": torch.ones(3) * 0.5, "albedo2": torch.ones(3), "texture": "plain", "texture_scale": 1.0,
              "specular": 0.0, "shininess": 8.0}
    out = render(_room(objects=[sphere]))
    height, width = out.mask.shape
    cy, cx = height // 2, width // 2
    torch.testing.assert_close(out.normal[cy, cx], torch.tensor([0.0, 0.0, 1.0]), atol=2e-2, rtol=0)
    assert out.normal[cy, cx + 5, 0] > 0.2  # right of centre: +x
    assert out.normal[cy - 5, cx, 1] > 0.2  # above centre: +y
    assert abs(out.depth[cy, cx].item() - 2.0) < 0.05  # the near pole, 1 m in front of the centre


@pytest.mark.parametrize("shape", SHAPES)
def test_analytic_normals_match_depth_differences(shape):
    angles, room = [], []
    for index in range(4):
        out = render(sample_scene(11, index, (160, 160), shapes=(shape,)))
        estimate, trusted = _normals_from_depth(out)
        on_object = trusted & (out.surface[1:-1, 1:-1] > 0)
        on_room = trusted & (out.surface[1:-1, 1:-1] == 0)
        angles.append(_angle(estimate[on_object], out.normal[1:-1, 1:-1][on_object]))
        room.append(_angle(estimate[on_room], out.normal[1:-1, 1:-1][on_room]))
    room = torch.cat(room)
    assert room.numel() > 1000 and room.max() < 0.1, "the room's planes"
    angles = torch.cat(angles)
    assert angles.numel() > 200, f"{shape}: only {angles.numel()} object pixels to compare"
    assert angles.median() < 0.5, f"{shape}: median {angles.median():.3f} degrees"
    assert torch.quantile(angles, 0.95) < 3.0, f"{shape}: 95th percentile {torch.quantile(angles, 0.95):.3f}"


def test_normals_are_unit_where_valid_and_zero_elsewhere():
    scene = sample_scene(5, 2, (48, 40))
    scene.room_open = torch.tensor([True, True, False, True, True, True])  # only the floor remains
    out = render(scene)
    assert 0 < out.mask.sum() < out.mask.numel()
    lengths = out.normal.norm(dim=-1)
    torch.testing.assert_close(lengths[out.mask], torch.ones(int(out.mask.sum())), atol=1e-5, rtol=0)
    assert (out.normal[~out.mask] == 0).all()
    assert torch.isinf(out.depth[~out.mask]).all() and torch.isfinite(out.depth[out.mask]).all()
    # Every visible normal faces the camera.
    rays = camera_rays(out.intrinsics, 48, 40)
    assert ((out.normal * -rays).sum(-1)[out.mask] > 0).all()
    assert out.image.shape == (48, 40, 3) and 0 <= out.image.min() and out.image.max() <= 1


def test_scenes_are_deterministic_per_seed_and_index():
    a, b = render(sample_scene(3, 9, (32, 32))), render(sample_scene(3, 9, (32, 32)))
    assert torch.equal(a.image, b.image) and torch.equal(a.normal, b.normal)
    c = render(sample_scene(3, 10, (32, 32)))
    assert not torch.equal(a.image, c.image)
    d = render(sample_scene(4, 9, (32, 32)))
    assert not torch.equal(a.normal, d.normal)


def test_unknown_shape_or_texture_is_refused():
    with pytest.raises(ValueError, match="unknown shape 'cone'"):
        sample_scene(0, 0, shapes=("cone",))
    with pytest.raises(ValueError, match="unknown texture 'marble'"):
        sample_scene(0, 0, textures=("marble",))


def test_export_npz_is_the_same_on_any_number_of_workers(tmp_path):
    here = normal_sets.export(tmp_path / "here", 5, 24, seed=2, workers=0)
    pool = normal_sets.export(tmp_path / "pool", 5, 24, seed=2, workers=2)
    assert here["count"] == pool["count"] == 5
    with np.load(tmp_path / "here" / "shard-00000.npz") as a, np.load(tmp_path / "pool" / "shard-00000.npz") as b:
        for key in ("image", "normal", "mask", "intrinsics"):
            np.testing.assert_array_equal(a[key], b[key])
        assert a["image"].dtype == np.uint8 and a["image"].shape == (5, 24, 24, 3)
        assert a["normal"].dtype == np.float16 and a["mask"].dtype == np.bool_
    manifest = json.loads((tmp_path / "here" / "manifest.json").read_text())
    assert manifest["seed"] == 2 and manifest["shards"] == [{"file": "shard-00000.npz", "count": 5}]


def test_export_png_layout_matches_the_renderer(tmp_path):
    normal_sets.export(tmp_path, 2, 20, seed=7, layout="png", workers=0, first_index=3)
    reference = render(sample_scene(7, 4, (20, 20)))
    npy = np.load(tmp_path / "normals" / "000004.npy")
    np.testing.assert_array_equal(npy, reference.normal.numpy())
    from PIL import Image
    png = np.asarray(Image.open(tmp_path / "normals" / "000004.png"))
    np.testing.assert_array_equal(png, normal_sets.encode_normals(reference.normal.numpy(), reference.mask.numpy()))
    k = json.loads((tmp_path / "intrinsics" / "000004.json").read_text())
    np.testing.assert_allclose(k, reference.intrinsics.numpy(), rtol=1e-6)


def test_encoding_of_a_camera_facing_normal():
    assert normal_sets.encode_normals(np.array([[[0.0, 0.0, 1.0]]])).tolist() == [[[128, 128, 255]]]
    assert normal_sets.encode_normals(np.array([[[0.0, 0.0, 1.0]]]), np.array([[False]])).tolist() == [[[0, 0, 0]]]


def test_dataset_crop_and_flip_keep_rays_and_normals_consistent(tmp_path):
    normal_sets.export(tmp_path, 3, 32, seed=1, workers=0)
    full = normal_sets.NormalScenes(tmp_path)
    image, normal, mask, k = full[1]
    assert image.shape == (3, 32, 32) and normal.shape == (3, 32, 32) and mask.shape == (32, 32)
    torch.manual_seed(0)
    cropped = normal_sets.NormalScenes(tmp_path, crop=20)
    c_image, c_normal, c_mask, c_k = cropped[1]
    # Find the window: the crop's rays must equal the full image's rays there.
    full_rays = ray_directions(k[None], 32, 32)[0]
    crop_rays = ray_directions(c_k[None], 20, 20)[0]
    top, left = int(round(k[1, 2].item() - c_k[1, 2].item())), int(round(k[0, 2].item() - c_k[0, 2].item()))
    torch.testing.assert_close(crop_rays, full_rays[:, top:top + 20, left:left + 20], atol=1e-6, rtol=0)
    torch.testing.assert_close(c_normal, normal[:, top:top + 20, left:left + 20])
    flipped = normal_sets.NormalScenes(tmp_path, flip=True)
    seen_flip = False
    for seed in range(8):
        torch.manual_seed(seed)
        f_image, f_normal, f_mask, f_k = flipped[1]
        if torch.equal(f_image, image):
            continue
        seen_flip = True
        torch.testing.assert_close(f_image, image.flip(-1))
        torch.testing.assert_close(f_normal[0], -normal[0].flip(-1))
        torch.testing.assert_close(f_normal[1:], normal[1:].flip(-1))
        assert math.isclose(f_k[0, 2].item(), 32 - k[0, 2].item())
        # The flipped sample is still geometrically consistent: visible normals face the flipped rays.
        rays = ray_directions(f_k[None], 32, 32)[0]
        assert ((f_normal * -rays).sum(0)[f_mask] > 0).all()
    assert seen_flip
    with pytest.raises(ValueError, match="crop 40 does not fit 32x32"):
        normal_sets.NormalScenes(tmp_path, crop=40)


def test_dataset_refuses_a_folder_without_manifest(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json"):
        normal_sets.NormalScenes(tmp_path)


def test_a_panned_camera_sees_the_same_world_turned():
    """Turning the camera left by 5 degrees turns the world right about the camera: every room pixel's
    normal is a face normal of the room turned that way, and zero yaw changes nothing."""
    scene = sample_scene(8, 1, (40, 40))
    assert torch.equal(render(panned(scene, 0.0)).normal, render(scene).normal)
    angle = math.radians(-5.0)
    turn = torch.tensor([[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0],
                         [-math.sin(angle), 0.0, math.cos(angle)]])
    for view, rotation in ((render(scene), scene.room_rotation), (render(panned(scene, 5.0)), turn @ scene.room_rotation)):
        faces = torch.cat([rotation.T, -rotation.T])  # rows: the six face normals in camera space
        room = view.normal[view.surface == 0]
        assert room.shape[0] > 100
        distance = (room[:, None] - faces[None]).norm(dim=-1).min(dim=1).values
        assert distance.max() < 1e-5
