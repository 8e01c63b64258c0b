"""A procedural scene renderer for surface-normal training data, in torch.

Each scene is a room (a box around the camera, randomly rotated, some faces missing so that rays
escape to an invalid "sky") holding spheres, boxes, capped cylinders, tori and superquadrics at
random poses. Pixels are ray-cast under a pinhole camera with a random field of view; the
ground-truth normals are the surfaces' analytic normals in camera space (DESIGN.md: +x right,
+y up, +z toward the camera, unit length), never estimated from depth.

Appearance is made to mislead a network that reads shape from colour alone: procedural albedo
textures (checker, stripes, sinusoidal noise) in each object's own frame, world-space paint and
image-space stains that cross object boundaries, several point lights with Lambertian and
Blinn-Phong terms and cast shadows, then exposure, sensor noise and blur.

Quadrics and boxes are intersected in closed form. Tori and superquadrics are implicit surfaces:
each ray inside an object's bounding sphere is sampled at ``IMPLICIT_SAMPLES`` points to bracket
the first sign change, then bisected, so depth and normal come from the same hit.

A scene depends only on ``(seed, index)``: the generator is seeded per image, so shards, workers
and batch sizes never change an image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = ("sphere", "box", "cylinder", "torus", "superquadric")
TEXTURES = ("plain", "checker", "stripes", "noise")
IMPLICIT_SAMPLES = 24
BISECTION_STEPS = 16
# Rays leave a surface this far along its normal, so shadow rays do not hit their own origin.
SURFACE_OFFSET = 1e-3
MISS = math.inf


@dataclass
class Scene:
    """Everything random about one image. Rotations are object-to-camera matrices."""
    size: tuple[int, int]  # (height, width)
    fov_degrees: float  # horizontal
    room_rotation: Tensor
    room_center: Tensor
    room_half: Tensor
    room_open: Tensor  # (6,) bool: face (axis, sign) = (i // 2, -1 if i % 2 == 0 else +1) is missing
    objects: list[dict] = field(default_factory=list)
    lights: Tensor = None  # (L, 3) positions
    light_colors: Tensor = None  # (L, 3)
    ambient: float = 0.1
    sky: Tensor = None  # (2, 3) colours, top and bottom
    world_paint: dict | None = None
    screen_stain: Tensor | None = None  # (1, 1, h, w) low-resolution field, or None
    exposure: float = 1.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0

    @property
    def intrinsics(self) -> Tensor:
        height, width = self.size
        focal = (width / 2) / math.tan(math.radians(self.fov_degrees) / 2)
        return torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])


@dataclass
class Rendering:
    image: Tensor  # (H, W, 3) float in [0, 1]
    normal: Tensor  # (H, W, 3) unit camera-space normals, zero where invalid
    mask: Tensor  # (H, W) bool: a surface was hit
    depth: Tensor  # (H, W) distance along -z to the hit, inf where invalid
    surface: Tensor  # (H, W) int: -1 nothing, 0 the room, 1 + i object i
    intrinsics: Tensor  # (3, 3) pixel-space K (OpenCV layout; the y axis of the rays is flipped)


# --------------------------------------------------------------------------------------------------
# Scene sampling


def random_rotation(generator: torch.Generator) -> Tensor:
    """A rotation matrix uniform over SO(3), from a normalised Gaussian quaternion."""
    w, x, y, z = F.normalize(torch.randn(4, generator=generator, dtype=torch.float64), dim=0).tolist()
    return torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def euler_rotation(yaw: float, pitch: float, roll: float) -> Tensor:
    cy, sy, cp, sp, cr, sr = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                              math.cos(roll), math.sin(roll))
    about_y = torch.tensor([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    about_x = torch.tensor([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    about_z = torch.tensor([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    return about_y @ about_x @ about_z


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(generator: torch.Generator, options) -> str:
    return options[int(torch.randint(len(options), (), generator=generator))]


def _colour(generator: torch.Generator, low: float = 0.15, high: float = 0.95) -> Tensor:
    return low + (high - low) * torch.rand(3, generator=generator)


def sample_scene(seed: int, index: int, size: tuple[int, int] = (128, 128), shapes=SHAPES,
                 textures=TEXTURES, max_objects: int = 7) -> Scene:
    """The scene of image ``index`` of the set drawn with ``seed``."""
    for name in shapes:
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r} (known: {', '.join(SHAPES)})")
    for name in textures:
        if name not in TEXTURES:
            raise ValueError(f"unknown texture {name!r} (known: {', '.join(TEXTURES)})")
    if not shapes or not textures:
        raise ValueError("scenes need at least one shape and one texture")
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    fov = _uniform(g, 40.0, 80.0)
    half = torch.tensor([_uniform(g, 2.5, 5.0), _uniform(g, 1.5, 3.0), _uniform(g, 3.0, 7.0)])
    # The camera stands inside, near one end, looking in; the room is tilted and turned around it.
    center = torch.tensor([_uniform(g, -0.5, 0.5) * half[0].item(), _uniform(g, -0.3, 0.5) * half[1].item(),
                           -half[2].item() + _uniform(g, 1.0, 2.0)])
    rotation = euler_rotation(math.radians(_uniform(g, -40, 40)), math.radians(_uniform(g, -25, 25)),
                              math.radians(_uniform(g, -12, 12)))
    room_open = torch.rand(6, generator=g) < torch.tensor([0.15, 0.15, 0.05, 0.35, 0.05, 0.2])
    room_open[2] = False  # the floor is always there
    scene = Scene(size=size, fov_degrees=fov, room_rotation=rotation, room_center=rotation @ center,
                  room_half=half, room_open=room_open)
    tan_half = math.tan(math.radians(fov) / 2)
    aspect = size[0] / size[1]
    for _ in range(int(torch.randint(2, max_objects + 1, (), generator=g))):
        kind = _choice(g, shapes)
        scale = _uniform(g, 0.35, 1.0)
        depth = _uniform(g, 2.0, 6.0)
        position = torch.tensor([_uniform(g, -0.8, 0.8) * tan_half * depth,
                                 _uniform(g, -0.8, 0.8) * tan_half * aspect * depth, -depth])
        obj = {"kind": kind, "center": position, "rotation": random_rotation(g),
               "albedo": _colour(g), "albedo2": _colour(g), "texture": _choice(g, textures),
               "texture_scale": _uniform(g, 2.0, 8.0), "specular": _uniform(g, 0.0, 0.6),
               "shininess": _uniform(g, 8.0, 64.0)}
        if kind == "sphere":
            obj["radius"] = scale
        elif kind == "box":
            obj["half"] = scale * torch.tensor([_uniform(g, 0.4, 1.0) for _ in range(3)])
        elif kind == "cylinder":
            obj["radius"], obj["half_height"] = scale * _uniform(g, 0.3, 0.8), scale * _uniform(g, 0.4, 1.0)
        elif kind == "torus":
            obj["major"] = scale * _uniform(g, 0.55, 0.8)
            obj["minor"] = obj["major"] * _uniform(g, 0.25, 0.45)
        else:
            obj["axes"] = scale * torch.tensor([_uniform(g, 0.4, 1.0) for _ in range(3)])
            obj["exponents"] = (_uniform(g, 0.4, 1.6), _uniform(g, 0.4, 1.6))
        scene.objects.append(obj)
    count = int(torch.randint(1, 4, (), generator=g))
    scene.lights = torch.stack([torch.tensor([_uniform(g, -2.5, 2.5), _uniform(g, 0.0, 2.5), _uniform(g, -4.0, 1.0)])
                                for _ in range(count)])
    scene.light_colors = torch.stack([_colour(g, 0.5, 1.0) * _uniform(g, 0.5, 1.1) for _ in range(count)])
    scene.ambient = _uniform(g, 0.03, 0.25)
    scene.sky = torch.stack([_colour(g, 0.3, 1.0), _colour(g, 0.3, 1.0)])
    if torch.rand((), generator=g) < 0.5:
        scene.world_paint = {"frequencies": torch.randn(4, 3, generator=g) * 1.5,
                             "phases": torch.rand(4, generator=g) * 2 * math.pi,
                             "colour": _colour(g), "strength": _uniform(g, 0.3, 0.8)}
    if torch.rand((), generator=g) < 0.4:
        scene.screen_stain = torch.rand(1, 1, 6, 6, generator=g)
    scene.exposure = _uniform(g, 0.7, 1.4)
    scene.noise_std = _uniform(g, 0.0, 0.03)
    scene.blur_sigma = _uniform(g, 0.0, 1.0) if torch.rand((), generator=g) < 0.5 else 0.0
    return scene


def panned(scene: Scene, yaw_degrees: float) -> Scene:
    """``scene`` seen by the camera turned ``yaw_degrees`` to the left about its vertical axis: the
    world (room, objects, lights, world-space paint) turns the other way around the camera."""
    angle = math.radians(-yaw_degrees)
    turn = torch.tensor([[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0],
                         [-math.sin(angle), 0.0, math.cos(angle)]])
    objects = [dict(obj, center=turn @ obj["center"], rotation=turn @ obj["rotation"]) for obj in scene.objects]
    paint = None if scene.world_paint is None else dict(scene.world_paint,
                                                        frequencies=scene.world_paint["frequencies"] @ turn.T)
    return replace(scene, room_rotation=turn @ scene.room_rotation, room_center=turn @ scene.room_center,
                   objects=objects, lights=scene.lights @ turn.T, world_paint=paint)


# --------------------------------------------------------------------------------------------------
# Ray casting


def camera_rays(intrinsics: Tensor, height: int, width: int) -> Tensor:
    """(H, W, 3) unit directions of the rays through pixel centres, in camera space (+y up,
    looking down -z). ``intrinsics`` is the pixel-space K, whose v axis points down."""
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                          torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
    directions = torch.stack([(u - cx) / fx, -(v - cy) / fy, -torch.ones_like(u)], dim=-1)
    return F.normalize(directions, dim=-1)


def _to_local(origins: Tensor, directions: Tensor, center: Tensor, rotation: Tensor) -> tuple[Tensor, Tensor]:
    return (origins - center) @ rotation, directions @ rotation


def _safe(values: Tensor) -> Tensor:
    """Divisors kept away from zero, sign preserved (a ray parallel to a slab never crosses it)."""
    return torch.where(values.abs() < 1e-12, torch.full_like(values, 1e-12), values)


def _room_hit(scene: Scene, origins: Tensor, directions: Tensor):
    """Where each ray leaves the room box; faces marked open are misses."""
    o, d = _to_local(origins, directions, scene.room_center, scene.room_rotation)
    d = _safe(d)
    exits = (torch.sign(d) * scene.room_half - o) / d  # (N, 3), positive from inside
    t, axis = exits.min(dim=-1)
    sign = torch.sign(d.gather(-1, axis[:, None]))[:, 0]
    face = axis * 2 + (sign > 0).long()
    t = torch.where(scene.room_open[face] | (t <= 0), torch.full_like(t, MISS), t)
    local_normal = -sign[:, None] * F.one_hot(axis, 3).to(d.dtype)
    return t, local_normal @ scene.room_rotation.T


def _sphere_hit(obj: dict, origins: Tensor, directions: Tensor):
    oc = origins - obj["center"]
    b = (oc * directions).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - obj["radius"] ** 2)
    root = disc.clamp_min(0).sqrt()
    near, far = -b - root, -b + root
    t = torch.where(near > 0, near, far)
    t = torch.where((disc >= 0) & (t > 0), t, torch.full_like(t, MISS))
    normal = F.normalize(oc + t.nan_to_num(posinf=0)[:, None] * directions, dim=-1)
    return t, normal


def _box_hit(obj: dict, origins: Tensor, directions: Tensor):
    o, d = _to_local(origins, directions, obj["center"], obj["rotation"])
    d = _safe(d)
    t1, t2 = (-obj["half"] - o) / d, (obj["half"] - o) / d
    t_enter, axis = torch.minimum(t1, t2).max(dim=-1)
    t_exit = torch.maximum(t1, t2).min(dim=-1).values
    t = torch.where(t_enter > 0, t_enter, t_exit)
    t = torch.where((t_exit >= t_enter) & (t > 0), t, torch.full_like(t, MISS))
    # Entering through face `axis`: the outward normal opposes the ray there.
    sign = -torch.sign(d.gather(-1, axis[:, None]))
    local_normal = sign * F.one_hot(axis, 3).to(d.dtype)
    return t, local_normal @ obj["rotation"].T


def _cylinder_hit(obj: dict, origins: Tensor, directions: Tensor):
    o, d = _to_local(origins, directions, obj["center"], obj["rotation"])
    radius, half_height = obj["radius"], obj["half_height"]
    a = (d[:, :2] ** 2).sum(-1).clamp_min(1e-12)
    b = (o[:, :2] * d[:, :2]).sum(-1)
    c = (o[:, :2] ** 2).sum(-1) - radius ** 2
    disc = b * b - a * c
    root = disc.clamp_min(0).sqrt()
    inf = torch.full_like(a, MISS)
    candidates = []
    for t_side in ((-b - root) / a, (-b + root) / a):
        z = o[:, 2] + t_side * d[:, 2]
        candidates.append(torch.where((disc >= 0) & (t_side > 0) & (z.abs() <= half_height), t_side, inf))
    dz = _safe(d[:, 2])
    for cap in (-half_height, half_height):
        t_cap = (cap - o[:, 2]) / dz
        xy = o[:, :2] + t_cap[:, None] * d[:, :2]
        candidates.append(torch.where((t_cap > 0) & ((xy ** 2).sum(-1) <= radius ** 2), t_cap, inf))
    t, which = torch.stack(candidates, -1).min(-1)
    hit = o + t.nan_to_num(posinf=0)[:, None] * d
    side_normal = F.pad(hit[:, :2], (0, 1))
    cap_normal = torch.zeros_like(hit)
    cap_normal[:, 2] = torch.where(which == 2, -1.0, 1.0)
    local_normal = F.normalize(torch.where((which < 2)[:, None], side_normal, cap_normal), dim=-1)
    return t, local_normal @ obj["rotation"].T


def _torus_field(p: Tensor, obj: dict, gradient: bool = False) -> Tensor:
    """Squared-distance form of the torus (axis z) in the object's frame, negative inside; or its gradient."""
    ring = p[..., :2].norm(dim=-1).clamp_min(1e-12)
    q = ring - obj["major"]
    if gradient:
        return torch.stack([q * p[..., 0] / ring, q * p[..., 1] / ring, p[..., 2]], -1)
    return q * q + p[..., 2] ** 2 - obj["minor"] ** 2


def _superquadric_field(p: Tensor, obj: dict, gradient: bool = False) -> Tensor:
    """Barr's inside-outside function F - 1 (negative inside; only its sign is used), or the
    gradient of F."""
    e1, e2 = obj["exponents"]
    axes = obj["axes"]
    scaled = (p / axes).abs().clamp_min(1e-12)
    xy_terms = scaled[..., :2] ** (2 / e2)
    xy = xy_terms.sum(-1)
    if not gradient:
        return xy ** (e2 / e1) + scaled[..., 2] ** (2 / e1) - 1
    sign = torch.sign(p)
    d_xy = (2 / e1) * xy[..., None] ** (e2 / e1 - 1) * xy_terms / scaled[..., :2] * sign[..., :2] / axes[:2]
    d_z = (2 / e1) * scaled[..., 2] ** (2 / e1 - 1) * sign[..., 2] / axes[2]
    return torch.cat([d_xy, d_z[..., None]], -1)


def _implicit_hit(obj: dict, origins: Tensor, directions: Tensor, field_fn, bound: float, any_hit: bool = False):
    """First crossing of ``field_fn`` along each ray inside the bounding sphere, by sampling then
    bisection. ``any_hit`` (shadow rays) stops at the bracket: the distance is the bracket's far
    end, and the normal is not computed."""
    count = origins.shape[0]
    t_out = torch.full((count,), MISS)
    normal_out = torch.zeros(count, 3)
    oc = origins - obj["center"]
    b = (oc * directions).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - bound ** 2)
    rays = torch.nonzero((disc > 0) & (-b + disc.clamp_min(0).sqrt() > 0)).flatten()
    if rays.numel() == 0:
        return t_out, normal_out
    root = disc[rays].sqrt()
    t0, t1 = (-b[rays] - root).clamp_min(0), -b[rays] + root
    o = oc[rays] @ obj["rotation"]
    d = directions[rays] @ obj["rotation"]
    steps = torch.linspace(0, 1, IMPLICIT_SAMPLES)
    ts = t0[:, None] + (t1 - t0)[:, None] * steps
    outside = field_fn(o[:, None] + ts[..., None] * d[:, None], obj) > 0
    crossing = outside[:, :-1] & ~outside[:, 1:]
    found = crossing.any(-1)
    first = crossing.float().argmax(-1, keepdim=True)
    low, high = ts.gather(1, first)[:, 0], ts.gather(1, first + 1)[:, 0]
    if any_hit:
        t_out[rays] = torch.where(found, high, torch.full_like(high, MISS))
        return t_out, normal_out
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        outside = field_fn(o + middle[:, None] * d, obj) > 0
        low, high = torch.where(outside, middle, low), torch.where(outside, high, middle)
    t = (low + high) / 2
    normal = F.normalize(field_fn(o + t[:, None] * d, obj, gradient=True) @ obj["rotation"].T, dim=-1)
    t_out[rays] = torch.where(found & (t > 0), t, torch.full_like(t, MISS))
    normal_out[rays] = normal
    return t_out, normal_out


def _object_hit(obj: dict, origins: Tensor, directions: Tensor, any_hit: bool = False):
    kind = obj["kind"]
    if kind == "sphere":
        return _sphere_hit(obj, origins, directions)
    if kind == "box":
        return _box_hit(obj, origins, directions)
    if kind == "cylinder":
        return _cylinder_hit(obj, origins, directions)
    if kind == "torus":
        return _implicit_hit(obj, origins, directions, _torus_field, obj["major"] + obj["minor"], any_hit)
    return _implicit_hit(obj, origins, directions, _superquadric_field, obj["axes"].norm().item(), any_hit)


def intersect(scene: Scene, origins: Tensor, directions: Tensor, any_hit: bool = False):
    """Closest hit of each ray: distance along the ray (inf for a miss), unit normal facing
    outward from the surface, and the hit's id (-1 miss, 0 room, 1 + i object i). With
    ``any_hit`` (shadow rays) only the distance counts, and implicit surfaces report the end of
    the sampling interval that holds their first crossing, which is enough to tell occlusion."""
    t, normal = _room_hit(scene, origins, directions)
    ids = torch.where(torch.isfinite(t), 0, -1)
    for index, obj in enumerate(scene.objects):
        t_obj, n_obj = _object_hit(obj, origins, directions, any_hit)
        closer = t_obj < t
        t = torch.where(closer, t_obj, t)
        normal = torch.where(closer[:, None], n_obj, normal)
        ids = torch.where(closer, index + 1, ids)
    return t, normal, ids


# --------------------------------------------------------------------------------------------------
# Shading


def _texture(kind: str, points: Tensor, scale: float) -> Tensor:
    """A pattern in [0, 1] over 3-D points of an object's own frame."""
    if kind == "checker":
        return (torch.floor(points * scale).sum(-1) % 2).float()
    if kind == "stripes":
        return (torch.sin(points[..., 0] * scale * math.pi + points[..., 2] * scale) > 0).float()
    if kind == "noise":
        p = points * scale
        return (0.5 + 0.25 * (torch.sin(p[..., 0] * 1.3 + torch.sin(p[..., 1] * 1.7))
                              + torch.sin(p[..., 1] * 0.9 - p[..., 2] * 1.1) * torch.cos(p[..., 2] * 1.5))).clamp(0, 1)
    return torch.zeros(points.shape[:-1])


def _albedo(scene: Scene, ids: Tensor, points: Tensor) -> Tensor:
    albedo = torch.zeros(ids.shape[0], 3)
    room = ids == 0
    if room.any():
        local = (points[room] - scene.room_center) @ scene.room_rotation
        pattern = _texture("checker", local, 0.5) * 0.5 + _texture("noise", local, 1.5) * 0.5
        albedo[room] = 0.35 + 0.4 * pattern[:, None] * torch.tensor([1.0, 0.95, 0.85])
    for index, obj in enumerate(scene.objects):
        hit = ids == index + 1
        if not hit.any():
            continue
        local = (points[hit] - obj["center"]) @ obj["rotation"]
        pattern = _texture(obj["texture"], local, obj["texture_scale"])[:, None]
        albedo[hit] = obj["albedo"] * (1 - pattern) + obj["albedo2"] * pattern
    if scene.world_paint is not None:
        paint = scene.world_paint
        field_value = torch.sin(points @ paint["frequencies"].T + paint["phases"]).sum(-1)
        weight = (paint["strength"] * (field_value > 1.0).float())[:, None]
        albedo = albedo * (1 - weight) + paint["colour"] * weight
    return albedo


def _blur(image: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.permute(2, 0, 1)[:, None]
    channels = F.conv2d(F.pad(channels, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    channels = F.conv2d(F.pad(channels, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return channels[:, 0].permute(1, 2, 0)


def render(scene: Scene, generator: torch.Generator | None = None) -> Rendering:
    """Ray-cast ``scene``: image, normals, validity mask and depth. ``generator`` draws the sensor
    noise (default: seeded from the scene, so a scene always renders the same)."""
    height, width = scene.size
    intrinsics = scene.intrinsics
    directions = camera_rays(intrinsics, height, width).reshape(-1, 3)
    origins = torch.zeros_like(directions)
    t, normal, ids = intersect(scene, origins, directions)
    valid = torch.isfinite(t)
    points = origins + t.nan_to_num(posinf=0)[:, None] * directions
    # Normals face the camera: a ray leaving through the room's inner wall sees its inward face.
    normal = torch.where(((normal * directions).sum(-1, keepdim=True) > 0), -normal, normal)

    light = torch.full((directions.shape[0], 3), scene.ambient)
    albedo = _albedo(scene, ids, points)
    specular = torch.zeros(directions.shape[0])
    shininess = torch.full((directions.shape[0],), 16.0)
    for index, obj in enumerate(scene.objects):
        specular = torch.where(ids == index + 1, obj["specular"], specular)
        shininess = torch.where(ids == index + 1, obj["shininess"], shininess)
    highlight = torch.zeros(directions.shape[0], 3)
    surface = torch.nonzero(valid).flatten()
    start = points[surface] + SURFACE_OFFSET * normal[surface]
    n = normal[surface]
    view = -directions[surface]
    for position, colour in zip(scene.lights, scene.light_colors):
        to_light = position - start
        distance = to_light.norm(dim=-1)
        to_light = to_light / distance[:, None]
        facing = (n * to_light).sum(-1)
        lit = facing > 0
        shadow_t = intersect(scene, start[lit], to_light[lit], any_hit=True)[0]
        unshadowed = torch.zeros_like(facing)
        unshadowed[lit] = (shadow_t >= distance[lit]).float()
        light[surface] += colour * (facing.clamp_min(0) * unshadowed)[:, None]
        half_vector = F.normalize(to_light + view, dim=-1)
        gloss = (n * half_vector).sum(-1).clamp_min(0) ** shininess[surface]
        highlight[surface] += colour * (specular[surface] * gloss * unshadowed)[:, None]

    colour = albedo * light + highlight
    if scene.screen_stain is not None:
        stain = F.interpolate(scene.screen_stain, size=(height, width), mode="bicubic", align_corners=False)
        colour = colour * (0.6 + 0.6 * stain.clamp(0, 1).reshape(-1, 1))
    rows = torch.linspace(0, 1, height).repeat_interleave(width)[:, None]
    sky = scene.sky[0] * (1 - rows) + scene.sky[1] * rows
    colour = torch.where(valid[:, None], colour * scene.exposure, sky)
    image = colour.clamp(0, 1) ** (1 / 2.2)
    image = image.reshape(height, width, 3)
    if scene.blur_sigma > 0:
        image = _blur(image, scene.blur_sigma)
    if scene.noise_std > 0:
        generator = generator or torch.Generator().manual_seed(int(scene.exposure * 1e9) % (2 ** 31))
        image = image + scene.noise_std * torch.randn(image.shape, generator=generator)
    depth = torch.where(valid, -points[:, 2], torch.full_like(t, MISS)).reshape(height, width)
    normal = torch.where(valid[:, None], normal, torch.zeros_like(normal)).reshape(height, width, 3)
    return Rendering(image=image.clamp(0, 1), normal=normal, mask=valid.reshape(height, width), depth=depth,
                     surface=ids.reshape(height, width), intrinsics=intrinsics)
