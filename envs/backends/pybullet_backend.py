"""PyBullet implementation of `PhysicsBackend`.

Each instance owns private DIRECT clients (the simulation, and a kinematic copy of the arm for
inverse kinematics), so several environments can share a process. Physics runs at PHYSICS_HZ;
one control period is round(PHYSICS_HZ / control_hz) sub-steps.

Determinism: Bullet keeps history in its broadphase and contact caches (incremental pair
clean-up, manifold order) that `restoreState` does not reset, so `reset` rebuilds the world
from scratch (`resetSimulation`) whenever it has been stepped since the last build; with
sorted overlapping pairs, the same episode and actions then give the same states and images
bit for bit, whatever ran before.

Rendering uses the CPU TinyRenderer (the EGL plugin on request, see EGL_ENV_VAR). The arm's visual
meshes are simplified once (vertex clustering, cached under the temp folder) since they
dominate the render time; collision meshes, masses and kinematics are the URDF's.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
import zlib

import numpy as np
import pybullet as p
import pybullet_data

from envs.backends.base import PhysicsBackend
from envs.rendering import gpu_present
from envs.scene import (BUTTON_BASE_HALF_HEIGHT, BUTTON_BASE_RADIUS_MARGIN, BUTTON_LIT_RGBA, BUTTON_TRAVEL,
                        DRAWER_HANDLE_HALF_WIDTH, DRAWER_HANDLE_OFFSET, DRAWER_HANDLE_RADIUS,
                        DRAWER_TRAVEL, GRIPPER_MAX_WIDTH, HOME_JOINTS, NUM_TABLE_TEXTURES,
                        TABLE_CENTER, TABLE_HALF_EXTENTS, EpisodeConfig, ObjectSpec, SceneSpec,
                        quat_to_matrix)

PHYSICS_HZ = 240.0
SOLVER_ITERATIONS = 50
SETTLE_TIME = 0.2  # seconds simulated after re-posing, arm held at home

# Arm (joint and link indices of pybullet_data's franka_panda/panda.urdf)
PANDA_URDF = "franka_panda/panda.urdf"
ARM_JOINTS = (0, 1, 2, 3, 4, 5, 6)
FINGER_JOINTS = (9, 10)
TCP_LINK = 11  # panda_grasptarget: 0.105 m along the hand's z, between the fingertip pads
ARM_FORCES = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)  # N m, the URDF's effort limits
ARM_POSITION_GAIN = 0.1
ARM_VELOCITY_GAIN = 1.0
ARM_DAMPING = 0.5  # nominal joint damping (N m s / rad), scaled by EpisodeConfig.damping
FINGER_FORCE = 40.0  # N per finger
FINGER_MAX_VELOCITY = 0.2  # m/s per finger
FINGER_POSITION_GAIN = 0.1
FINGER_FRICTION = 2.0
FINGER_SPINNING_FRICTION = 0.1
FINGER_GEAR_FORCE = 100.0
IK_ITERATIONS = 20  # null-space solve
IK_REFINE_ITERATIONS = 20  # plain solve from the null-space answer
IK_THRESHOLD = 1e-5

# Fixtures
TABLE_FRICTION = 1.0
WALL = 0.01  # tray and cabinet wall thickness
DRAWER_GAP = 0.003  # clearance between the drawer and the cabinet
DRAWER_MASS = 0.5
DRAWER_DAMPING = 4.0  # N s / m, scaled by EpisodeConfig.damping
DRAWER_FRICTION_FORCE = 0.5  # N, dry friction of the slide
DRAWER_HANDLE_POST_HALF = 0.006
FIXTURE_FRICTION = 1.0
HANDLE_RGBA = (0.25, 0.25, 0.28, 1.0)
BUTTON_CAP_MASS = 0.2
BUTTON_SPRING_FORCE = 5.0  # N: force-limited servo that returns the cap to 0
BUTTON_SPRING_GAIN = 0.05
BUTTON_DAMPING = 1.0  # N s / m, scaled by EpisodeConfig.damping
JOINT_LIMIT_FORCE = 1000.0
BUTTON_BASE_RGBA = (0.3, 0.3, 0.32, 1.0)
DEFAULT_RGBA = (0.7, 0.7, 0.7, 1.0)

# Rendering
NEAR, FAR = 0.01, 5.0
WRIST_FOVY = 70.0
WRIST_EYE = (0.07, 0.0, -0.05)  # in the TCP frame: beside the hand, above the fingertips
WRIST_TARGET = (0.0, 0.0, 0.15)  # in the TCP frame: ahead of the fingertips
LIGHT_TARGET = np.array([0.45, 0.0, 0.0])  # the light shines from light_pos towards here
LIGHT_AMBIENT = 0.45
LIGHT_SPECULAR = 0.05
RENDER_SHADOWS = 0  # TinyRenderer shadows double the render time
# Hardware rendering through pybullet's EGL plugin is opt-in (EMBODIED_PYBULLET_EGL=1, and a GPU):
# the plugin supports one instance per process (bullet3 issues 2507, 3318), and mixing it with
# TinyRenderer in one process would give different images for the same episode.
EGL_ENV_VAR = "EMBODIED_PYBULLET_EGL"
SIMPLIFY_ARM_MESHES = True
MESH_CELL = 0.008  # vertex-clustering cell (m) for the arm's visual meshes

_ASSET_VERSION = "v1"
_IDENTITY_QUAT = (0.0, 0.0, 0.0, 1.0)
_QUAT_X90 = (float(np.sin(np.pi / 4)), 0.0, 0.0, float(np.cos(np.pi / 4)))  # cylinder axis z -> y


def _yaw_quat(yaw: float) -> tuple:
    return (0.0, 0.0, float(np.sin(yaw / 2)), float(np.cos(yaw / 2)))


# ----------------------------------------------------------------------------- cached assets

def _asset_dir() -> str:
    key = hashlib.sha1(f"{_ASSET_VERSION} {pybullet_data.getDataPath()} {MESH_CELL}".encode()).hexdigest()[:12]
    folder = os.path.join(tempfile.gettempdir(), f"embodied_pybullet_assets_{key}")
    os.makedirs(folder, exist_ok=True)
    return folder


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _png(rgb: np.ndarray) -> bytes:
    """Minimal PNG encoder (8-bit RGB)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _texture_image(index: int, size: int = 128) -> np.ndarray:
    """Grey-level looks, tinted by the table rgba: 0 plain, 1 checker, 2 wood grain, 3 speckle."""
    v, u = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(1234 + index)
    if index == 0:
        g = np.ones((size, size))
    elif index == 1:
        g = np.where((np.floor(u * 8) + np.floor(v * 8)) % 2 == 0, 1.0, 0.72)
    elif index == 2:
        wobble = 0.4 * np.sin(2 * np.pi * (u * 1.3 + 0.2)) + 0.15 * np.sin(2 * np.pi * u * 4.1)
        g = 0.84 + 0.1 * np.sin(2 * np.pi * (v * 14 + wobble)) + 0.03 * rng.normal(0, 1, (size, size))
    else:
        coarse = rng.uniform(0, 1, (size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
        g = 0.7 + 0.15 * coarse + 0.15 * rng.uniform(0, 1, (size, size))
    g = np.clip(g, 0.0, 1.0)
    return np.repeat((g * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _texture_files() -> list[str]:
    folder = _asset_dir()
    paths = []
    for i in range(NUM_TABLE_TEXTURES):
        path = os.path.join(folder, f"table_{i}.png")
        if not os.path.exists(path):
            _write_atomic(path, _png(_texture_image(i)))
        paths.append(path)
    return paths


def _simplify_obj(text: str, cell: float) -> str:
    """Vertex clustering: vertices in the same `cell`-sized voxel merge into their mean;
    collapsed and duplicate triangles are dropped; UVs, normals and materials are kept."""
    lines = text.splitlines()
    verts, header, groups, current = [], [], [], None
    for line in lines:
        if line.startswith("v "):
            verts.append(line.split()[1:4])
        elif line.startswith("mtllib"):
            header.append(line)
        elif line.startswith(("o ", "g ")):
            current = [line, None, []]
            groups.append(current)
        elif line.startswith("usemtl"):
            if current is None or current[1] is not None:
                current = [current[0] if current else "o part", None, []]
                groups.append(current)
            current[1] = line
        elif line.startswith("f "):
            if current is None:
                current = ["o part", None, []]
                groups.append(current)
            corners = [c.split("/") for c in line.split()[1:]]
            for k in range(1, len(corners) - 1):
                current[2].append((corners[0], corners[k], corners[k + 1]))
    v = np.array(verts, dtype=np.float64)
    _, cluster, counts = np.unique(np.floor(v / cell).astype(np.int64), axis=0, return_inverse=True,
                                   return_counts=True)
    cluster = cluster.ravel()
    centres = np.zeros((len(counts), 3))
    np.add.at(centres, cluster, v)
    centres /= counts[:, None]
    out = header + [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in centres]
    out += [line for line in lines if line.startswith(("vt ", "vn "))]
    for name, material, faces in groups:
        if not faces:
            continue
        idx = np.array([[int(c[0]) for c in tri] for tri in faces])
        idx = np.where(idx < 0, idx + len(v), idx - 1)
        cf = cluster[idx]
        keep = np.nonzero((cf[:, 0] != cf[:, 1]) & (cf[:, 1] != cf[:, 2]) & (cf[:, 0] != cf[:, 2]))[0]
        if len(keep) == 0:
            continue
        _, first = np.unique(np.sort(cf[keep], axis=1), axis=0, return_index=True)
        keep = keep[np.sort(first)]
        out.append(name)
        if material:
            out.append(material)
        for i in keep:
            out.append("f " + " ".join("/".join([str(cf[i, k] + 1)] + faces[i][k][1:]) for k in range(3)))
    return "\n".join(out) + "\n"


def _panda_urdf() -> str:
    """pybullet_data's panda.urdf, with simplified visual meshes (cached) when enabled."""
    source = os.path.join(pybullet_data.getDataPath(), PANDA_URDF)
    if not SIMPLIFY_ARM_MESHES:
        return source
    try:
        folder = os.path.join(_asset_dir(), "panda")
        urdf = os.path.join(folder, "panda.urdf")
        if os.path.exists(urdf):
            return urdf
        os.makedirs(folder, exist_ok=True)
        meshes = os.path.join(os.path.dirname(source), "meshes")
        visual = os.path.join(meshes, "visual")
        for name in sorted(os.listdir(visual)):
            src = os.path.join(visual, name)
            if name.endswith(".obj"):
                with open(src) as f:
                    _write_atomic(os.path.join(folder, name), _simplify_obj(f.read(), MESH_CELL).encode())
            else:  # materials and their texture
                shutil.copyfile(src, os.path.join(folder, f"{name}.tmp{os.getpid()}"))
                os.replace(os.path.join(folder, f"{name}.tmp{os.getpid()}"), os.path.join(folder, name))
        with open(source) as f:
            text = f.read()
        text = text.replace("package://meshes/visual/", folder + os.sep)
        text = text.replace("package://meshes/collision/", os.path.join(meshes, "collision") + os.sep)
        _write_atomic(urdf, text.encode())  # written last: its presence marks a complete cache
        return urdf
    except OSError:
        return source


# ----------------------------------------------------------------------------- backend

class PybulletBackend(PhysicsBackend):
    name = "pybullet"

    def __init__(self, image_size=(224, 224), wrist_camera: bool = False, control_hz: float = 10.0):
        super().__init__(image_size, wrist_camera, control_hz)
        self.n_substeps = max(1, int(round(PHYSICS_HZ / control_hz)))
        self._closed = False
        self.client = p.connect(p.DIRECT)
        self._ik_client = p.connect(p.DIRECT)
        if self.client < 0 or self._ik_client < 0:
            raise RuntimeError("could not start a pybullet DIRECT client")
        self._renderer = p.ER_TINY_RENDERER
        if os.environ.get(EGL_ENV_VAR) == "1" and gpu_present():
            self._try_egl()
        self.scene: SceneSpec | None = None
        self._stepped = False
        self._view = None

    def _try_egl(self) -> None:
        try:
            import pkgutil
            egl = pkgutil.get_loader("eglRenderer")
            plugin = (p.loadPlugin(egl.get_filename(), "_eglRendererPlugin", physicsClientId=self.client)
                      if egl else p.loadPlugin("eglRendererPlugin", physicsClientId=self.client))
            if plugin >= 0:
                self._renderer = p.ER_BULLET_HARDWARE_OPENGL
        except Exception:  # no usable EGL: stay on TinyRenderer
            self._renderer = p.ER_TINY_RENDERER

    # ------------------------------------------------------------------ building
    def build(self, scene: SceneSpec) -> None:
        if self.scene is not None:
            raise RuntimeError("build() may only be called once")
        for obj in scene.objects:
            if not hasattr(self, f"_build_{obj.kind}"):
                raise ValueError(f"unknown object kind {obj.kind!r} for {obj.name!r}")
        self.scene = scene
        self._specs: dict[str, ObjectSpec] = {obj.name: obj for obj in scene.objects}
        self._urdf = _panda_urdf()
        self._texture_paths = _texture_files()

        ik = self._ik_client
        self._ik_robot = p.loadURDF(self._urdf, useFixedBase=True, flags=p.URDF_IGNORE_VISUAL_SHAPES, physicsClientId=ik)
        info = [p.getJointInfo(self._ik_robot, j, physicsClientId=ik) for j in range(p.getNumJoints(self._ik_robot, physicsClientId=ik))]
        movable = [i for i in info if i[2] != p.JOINT_FIXED]
        if [i[0] for i in movable] != list(ARM_JOINTS + FINGER_JOINTS) or info[TCP_LINK][12] != b"panda_grasptarget":
            raise RuntimeError(f"unexpected joint layout in {self._urdf}")
        for j in FINGER_JOINTS:
            p.resetJointState(self._ik_robot, j, GRIPPER_MAX_WIDTH / 2, physicsClientId=ik)
        self._ik_lower = [i[8] for i in movable]
        self._ik_upper = [i[9] for i in movable]
        self._ik_ranges = [hi - lo for lo, hi in zip(self._ik_lower, self._ik_upper)]
        self._ik_rest = list(HOME_JOINTS) + [GRIPPER_MAX_WIDTH / 2] * 2

        self._build_world()

    def _build_world(self) -> None:
        """A fresh world: table, arm at home, the scene's objects."""
        c = self.client
        p.resetSimulation(physicsClientId=c)
        p.setPhysicsEngineParameter(fixedTimeStep=1.0 / PHYSICS_HZ, numSubSteps=0,
                                    numSolverIterations=SOLVER_ITERATIONS, deterministicOverlappingPairs=1,
                                    physicsClientId=c)
        p.setGravity(0, 0, -9.81, physicsClientId=c)

        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=TABLE_HALF_EXTENTS, physicsClientId=c)
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=TABLE_HALF_EXTENTS, physicsClientId=c)
        self.table = p.createMultiBody(0, col, vis, TABLE_CENTER, physicsClientId=c)
        p.changeDynamics(self.table, -1, lateralFriction=TABLE_FRICTION, physicsClientId=c)
        self._textures = [p.loadTexture(path, physicsClientId=c) for path in self._texture_paths]

        self.robot = p.loadURDF(self._urdf, basePosition=(0, 0, 0), useFixedBase=True, physicsClientId=c)
        for j in FINGER_JOINTS:
            p.changeDynamics(self.robot, j, lateralFriction=FINGER_FRICTION, spinningFriction=FINGER_SPINNING_FRICTION,
                             frictionAnchor=1, physicsClientId=c)
        # The real fingers are coupled (the URDF's mimic, which pybullet ignores).
        gear = p.createConstraint(self.robot, FINGER_JOINTS[0], self.robot, FINGER_JOINTS[1], p.JOINT_GEAR,
                                  (1, 0, 0), (0, 0, 0), (0, 0, 0), physicsClientId=c)
        p.changeConstraint(gear, gearRatio=-1, erp=0.1, maxForce=FINGER_GEAR_FORCE, physicsClientId=c)

        self.bodies: dict[str, int] = {}
        for obj in self.scene.objects:
            self.bodies[obj.name] = getattr(self, f"_build_{obj.kind}")(obj)
        self._set_arm_home()
        self._apply_damping(1.0)
        self._stepped = False

    def _shapes(self, parts, collision=True):
        """A compound (collision, visual) pair from parts (geom type, dims, position, orientation);
        dims: box half extents, cylinder (radius, half length), sphere (radius,)."""
        c = self.client
        types = [kind for kind, *_ in parts]
        halves = [dims if kind == p.GEOM_BOX else (0, 0, 0) for kind, dims, *_ in parts]
        radii = [dims[0] if kind != p.GEOM_BOX else 0.0 for kind, dims, *_ in parts]
        lengths = [2 * dims[1] if kind == p.GEOM_CYLINDER else 0.0 for kind, dims, *_ in parts]
        poss = [pos for *_, pos, _ in parts]
        orns = [orn for *_, orn in parts]
        col = -1
        if collision:
            col = p.createCollisionShapeArray(types, halfExtents=halves, radii=radii, lengths=lengths,
                                              collisionFramePositions=poss, collisionFrameOrientations=orns,
                                              physicsClientId=c)
        vis = p.createVisualShapeArray(types, halfExtents=halves, radii=radii, lengths=lengths,
                                       visualFramePositions=poss, visualFrameOrientations=orns, physicsClientId=c)
        return col, vis

    def _multibody(self, col, vis, links=()):
        """A static base (mass 0) with optional links: dicts of mass, col, vis, pos, com, parent, type, axis."""
        kw = {}
        if links:
            kw = dict(linkMasses=[l["mass"] for l in links],
                      linkCollisionShapeIndices=[l["col"] for l in links],
                      linkVisualShapeIndices=[l["vis"] for l in links],
                      linkPositions=[l["pos"] for l in links],
                      linkOrientations=[_IDENTITY_QUAT for _ in links],
                      linkInertialFramePositions=[l.get("com", (0, 0, 0)) for l in links],
                      linkInertialFrameOrientations=[_IDENTITY_QUAT for _ in links],
                      linkParentIndices=[l["parent"] for l in links],
                      linkJointTypes=[l["type"] for l in links],
                      linkJointAxis=[l.get("axis", (0, 0, 1)) for l in links])
        return p.createMultiBody(0, col, vis, (0, 0, 0), physicsClientId=self.client, **kw)

    def _build_box(self, obj):
        c = self.client
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=obj.size, physicsClientId=c)
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=obj.size, physicsClientId=c)
        body = p.createMultiBody(obj.mass, col, vis, (0, 0, obj.size[2]), physicsClientId=c)
        p.changeDynamics(body, -1, lateralFriction=obj.friction, physicsClientId=c)
        return body

    def _build_tray(self, obj):
        """Static floor (0.01 thick) and four walls (0.01 thick, `size[2]` high) around the inner
        area; base frame at the centre of the floor's underside, which rests on the table."""
        ix, iy, h = obj.size
        t = WALL
        parts = [
            (p.GEOM_BOX, (ix + t, iy + t, t / 2), (0, 0, t / 2), _IDENTITY_QUAT),
            (p.GEOM_BOX, (t / 2, iy + t, h / 2), (ix + t / 2, 0, h / 2), _IDENTITY_QUAT),
            (p.GEOM_BOX, (t / 2, iy + t, h / 2), (-ix - t / 2, 0, h / 2), _IDENTITY_QUAT),
            (p.GEOM_BOX, (ix, t / 2, h / 2), (0, iy + t / 2, h / 2), _IDENTITY_QUAT),
            (p.GEOM_BOX, (ix, t / 2, h / 2), (0, -iy - t / 2, h / 2), _IDENTITY_QUAT),
        ]
        body = self._multibody(*self._shapes(parts))
        p.changeDynamics(body, -1, lateralFriction=FIXTURE_FRICTION, physicsClientId=self.client)
        return body

    def _build_marker(self, obj):
        """Visual-only flat cylinder (axis z), base frame at its centre."""
        r, hh = obj.size
        return self._multibody(*self._shapes([(p.GEOM_CYLINDER, (r, hh), (0, 0, 0), _IDENTITY_QUAT)], collision=False))

    def _build_sphere(self, obj):
        return self._multibody(*self._shapes([(p.GEOM_SPHERE, (obj.size[0],), (0, 0, 0), _IDENTITY_QUAT)],
                                             collision=False))

    def _build_drawer(self, obj):
        """Cabinet (static base, open at local -x; base frame at its centre), drawer (link 0,
        prismatic along local -x, value = opening) and handle (link 1, fixed to the drawer)."""
        sx, sy, sz = obj.size
        t, g = WALL, DRAWER_GAP
        cabinet = [
            (p.GEOM_BOX, (t / 2, sy, sz), (sx - t / 2, 0, 0), _IDENTITY_QUAT),  # back
            (p.GEOM_BOX, (sx, t / 2, sz), (0, sy - t / 2, 0), _IDENTITY_QUAT),  # sides
            (p.GEOM_BOX, (sx, t / 2, sz), (0, -sy + t / 2, 0), _IDENTITY_QUAT),
            (p.GEOM_BOX, (sx, sy, t / 2), (0, 0, sz - t / 2), _IDENTITY_QUAT),  # top
            (p.GEOM_BOX, (sx, sy, t / 2), (0, 0, -sz + t / 2), _IDENTITY_QUAT),  # bottom
        ]
        # The drawer at opening 0, in the cabinet frame: front panel flush with the cabinet front.
        iy, iz = sy - t - g, sz - t - g
        depth = 2 * sx - t - g
        x0 = -sx
        bottom_z = -iz + t / 2
        wall_h = 0.6 * iz
        drawer = [
            (p.GEOM_BOX, (t / 2, iy, iz), (x0 + t / 2, 0, 0), _IDENTITY_QUAT),  # front panel
            (p.GEOM_BOX, (depth / 2 - t / 2, iy, t / 2), (x0 + depth / 2 + t / 2, 0, bottom_z), _IDENTITY_QUAT),
            (p.GEOM_BOX, (t / 2, iy, wall_h), (x0 + depth - t / 2, 0, -iz + wall_h), _IDENTITY_QUAT),
            (p.GEOM_BOX, (depth / 2, t / 2, wall_h), (x0 + depth / 2, iy - t / 2, -iz + wall_h), _IDENTITY_QUAT),
            (p.GEOM_BOX, (depth / 2, t / 2, wall_h), (x0 + depth / 2, -iy + t / 2, -iz + wall_h), _IDENTITY_QUAT),
        ]
        # Handle bar along y in front of the drawer face, on two posts at y = +-HALF_WIDTH.
        hx = -sx - DRAWER_HANDLE_OFFSET
        post = DRAWER_HANDLE_OFFSET / 2
        handle = [
            (p.GEOM_CYLINDER, (DRAWER_HANDLE_RADIUS, DRAWER_HANDLE_HALF_WIDTH + 0.012), (hx, 0, 0), _QUAT_X90),
            (p.GEOM_BOX, (post, DRAWER_HANDLE_POST_HALF, DRAWER_HANDLE_POST_HALF), (-sx - post, DRAWER_HANDLE_HALF_WIDTH, 0),
             _IDENTITY_QUAT),
            (p.GEOM_BOX, (post, DRAWER_HANDLE_POST_HALF, DRAWER_HANDLE_POST_HALF), (-sx - post, -DRAWER_HANDLE_HALF_WIDTH, 0),
             _IDENTITY_QUAT),
        ]
        dr_col, dr_vis = self._shapes(drawer)
        h_col, h_vis = self._shapes(handle)
        links = [
            dict(mass=DRAWER_MASS, col=dr_col, vis=dr_vis, pos=(0, 0, 0), com=(x0 + depth / 2, 0, bottom_z),
                 parent=0, type=p.JOINT_PRISMATIC, axis=(-1, 0, 0)),
            dict(mass=0.05, col=h_col, vis=h_vis, pos=(0, 0, 0), com=(hx, 0, 0), parent=1, type=p.JOINT_FIXED),
        ]
        body = self._multibody(*self._shapes(cabinet), links)
        c = self.client
        p.changeDynamics(body, 0, jointLowerLimit=0.0, jointUpperLimit=DRAWER_TRAVEL, jointLimitForce=JOINT_LIMIT_FORCE,
                         physicsClientId=c)
        for link in (-1, 0, 1):
            p.changeDynamics(body, link, lateralFriction=FIXTURE_FRICTION, physicsClientId=c)
        p.setJointMotorControl2(body, 0, p.VELOCITY_CONTROL, targetVelocity=0, force=DRAWER_FRICTION_FORCE,
                                physicsClientId=c)
        return body

    def _build_button(self, obj):
        """Static base cylinder on the table (base frame at its bottom centre) and a cap (link 0)
        on a prismatic joint along z (value = press depth), sprung back by a force-limited servo."""
        r, hh = obj.size
        base = [(p.GEOM_CYLINDER, (r + BUTTON_BASE_RADIUS_MARGIN, BUTTON_BASE_HALF_HEIGHT), (0, 0, BUTTON_BASE_HALF_HEIGHT),
                 _IDENTITY_QUAT)]
        cap_col, cap_vis = self._shapes([(p.GEOM_CYLINDER, (r, hh), (0, 0, 0), _IDENTITY_QUAT)])
        links = [dict(mass=BUTTON_CAP_MASS, col=cap_col, vis=cap_vis, pos=(0, 0, 2 * BUTTON_BASE_HALF_HEIGHT + hh),
                      parent=0, type=p.JOINT_PRISMATIC, axis=(0, 0, 1))]
        body = self._multibody(*self._shapes(base), links)
        c = self.client
        p.changeDynamics(body, 0, jointLowerLimit=-BUTTON_TRAVEL, jointUpperLimit=0.0, jointLimitForce=JOINT_LIMIT_FORCE,
                         physicsClientId=c)
        p.changeVisualShape(body, -1, rgbaColor=BUTTON_BASE_RGBA, physicsClientId=c)
        p.setJointMotorControl2(body, 0, p.POSITION_CONTROL, targetPosition=0.0, force=BUTTON_SPRING_FORCE,
                                positionGain=BUTTON_SPRING_GAIN, physicsClientId=c)
        return body

    # ------------------------------------------------------------------ reset
    def _set_arm_home(self) -> None:
        c, r = self.client, self.robot
        for j, q in zip(ARM_JOINTS, HOME_JOINTS):
            p.resetJointState(r, j, q, 0.0, physicsClientId=c)
        for j in FINGER_JOINTS:
            p.resetJointState(r, j, GRIPPER_MAX_WIDTH / 2, 0.0, physicsClientId=c)
        self._arm_targets(HOME_JOINTS, 1.0)

    def _arm_targets(self, q, gripper: float) -> None:
        c, r = self.client, self.robot
        p.setJointMotorControlArray(r, ARM_JOINTS, p.POSITION_CONTROL, targetPositions=q, forces=ARM_FORCES,
                                    positionGains=(ARM_POSITION_GAIN,) * 7, velocityGains=(ARM_VELOCITY_GAIN,) * 7,
                                    physicsClientId=c)
        half = min(max(float(gripper), 0.0), 1.0) * GRIPPER_MAX_WIDTH / 2
        for j in FINGER_JOINTS:
            p.setJointMotorControl2(r, j, p.POSITION_CONTROL, targetPosition=half, force=FINGER_FORCE,
                                    positionGain=FINGER_POSITION_GAIN, maxVelocity=FINGER_MAX_VELOCITY,
                                    physicsClientId=c)

    def _apply_damping(self, scale: float) -> None:
        c = self.client
        self._damping_scale = float(scale)
        for j in ARM_JOINTS:
            p.changeDynamics(self.robot, j, jointDamping=ARM_DAMPING * scale, physicsClientId=c)
        for name, obj in self._specs.items():
            nominal = {"drawer": DRAWER_DAMPING, "button": BUTTON_DAMPING}.get(obj.kind)
            if nominal is not None:
                p.changeDynamics(self.bodies[name], 0, jointDamping=nominal * scale, physicsClientId=c)

    def reset(self, episode: EpisodeConfig) -> None:
        if self.scene is None:
            raise RuntimeError("build() must be called before reset()")
        if self._stepped:
            self._build_world()
        c = self.client

        tex = int(episode.table_texture) % len(self._textures)
        p.changeVisualShape(self.table, -1, rgbaColor=episode.table_rgba, textureUniqueId=self._textures[tex],
                            physicsClientId=c)
        for name, obj in self._specs.items():
            body = self.bodies[name]
            if name in episode.poses:
                pos, yaw = episode.poses[name]
                p.resetBasePositionAndOrientation(body, pos, _yaw_quat(yaw), physicsClientId=c)
            rgba = episode.rgba.get(name, DEFAULT_RGBA)
            if obj.kind == "box":
                p.changeVisualShape(body, -1, rgbaColor=rgba, physicsClientId=c)
                p.changeDynamics(body, -1, mass=episode.mass_of(obj), lateralFriction=episode.friction_of(obj),
                                 physicsClientId=c)
            elif obj.kind == "drawer":
                for link in (-1, 0):
                    p.changeVisualShape(body, link, rgbaColor=rgba, physicsClientId=c)
                p.changeVisualShape(body, 1, rgbaColor=HANDLE_RGBA, physicsClientId=c)
                q = min(max(float(episode.joints.get(name, 0.0)), 0.0), DRAWER_TRAVEL)
                p.resetJointState(body, 0, q, 0.0, physicsClientId=c)
            elif obj.kind == "button":
                p.changeVisualShape(body, 0, rgbaColor=rgba, physicsClientId=c)
                p.changeVisualShape(body, -1, rgbaColor=BUTTON_BASE_RGBA, physicsClientId=c)
                q = min(max(float(episode.joints.get(name, 0.0)), -BUTTON_TRAVEL), 0.0)
                p.resetJointState(body, 0, q, 0.0, physicsClientId=c)
            else:
                p.changeVisualShape(body, -1, rgbaColor=rgba, physicsClientId=c)
        self._apply_damping(episode.damping)
        self._set_arm_home()

        cam = episode.camera
        h, w = self.image_size
        self._view = p.computeViewMatrix(cam.eye, cam.target, (0, 0, 1), physicsClientId=c)
        self._proj = p.computeProjectionMatrixFOV(cam.fovy_deg, w / h, NEAR, FAR, physicsClientId=c)
        self._wrist_proj = p.computeProjectionMatrixFOV(WRIST_FOVY, w / h, NEAR, FAR, physicsClientId=c)
        to_light = np.asarray(episode.light_pos, dtype=float) - LIGHT_TARGET
        distance = float(np.linalg.norm(to_light))
        self._light = dict(lightDirection=tuple(float(x) for x in to_light / distance), lightColor=(1.0, 1.0, 1.0),
                           lightDistance=distance, shadow=RENDER_SHADOWS, lightAmbientCoeff=LIGHT_AMBIENT,
                           lightDiffuseCoeff=float(episode.light_intensity), lightSpecularCoeff=LIGHT_SPECULAR)

        self._stepped = True
        for _ in range(int(round(SETTLE_TIME * PHYSICS_HZ))):
            p.stepSimulation(physicsClientId=c)

    # ------------------------------------------------------------------ control
    def apply_action(self, target_pos, target_quat, gripper: float) -> None:
        c = self.client
        self._arm_targets(self._solve_ik(target_pos, target_quat), gripper)
        self._stepped = True
        for _ in range(self.n_substeps):
            p.stepSimulation(physicsClientId=c)

    def _solve_ik(self, target_pos, target_quat):
        """Arm joint targets for a TCP pose, on the kinematic copy of the arm set to the current
        joints: pybullet's null-space solver (joint limits, rest pose HOME_JOINTS), whose answer
        keeps a bias of a few mm, polished by the plain solver starting from it."""
        ik, ikr = self._ik_client, self._ik_robot
        pos = [float(v) for v in target_pos]
        quat = [float(v) for v in target_quat]
        for j, s in zip(ARM_JOINTS, p.getJointStates(self.robot, ARM_JOINTS, physicsClientId=self.client)):
            p.resetJointState(ikr, j, s[0], physicsClientId=ik)
        q = p.calculateInverseKinematics(
            ikr, TCP_LINK, pos, quat, lowerLimits=self._ik_lower, upperLimits=self._ik_upper,
            jointRanges=self._ik_ranges, restPoses=self._ik_rest, maxNumIterations=IK_ITERATIONS,
            residualThreshold=IK_THRESHOLD, physicsClientId=ik)
        for j in ARM_JOINTS:
            p.resetJointState(ikr, j, q[j], physicsClientId=ik)
        q = p.calculateInverseKinematics(ikr, TCP_LINK, pos, quat, maxNumIterations=IK_REFINE_ITERATIONS,
                                         residualThreshold=IK_THRESHOLD, physicsClientId=ik)
        return [min(max(q[j], self._ik_lower[j]), self._ik_upper[j]) for j in ARM_JOINTS]

    # ------------------------------------------------------------------ sensing
    def ee_pose(self):
        s = p.getLinkState(self.robot, TCP_LINK, computeForwardKinematics=1, physicsClientId=self.client)
        return np.array(s[4]), np.array(s[5])

    def gripper_opening(self) -> float:
        s = p.getJointStates(self.robot, FINGER_JOINTS, physicsClientId=self.client)
        return float(min(max(s[0][0] + s[1][0], 0.0), GRIPPER_MAX_WIDTH))

    def object_pose(self, name: str):
        pos, orn = p.getBasePositionAndOrientation(self._body(name), physicsClientId=self.client)
        return np.array(pos), np.array(orn)

    def joint_position(self, name: str) -> float:
        body = self._body(name)
        kind = self._specs[name].kind
        if kind not in ("drawer", "button"):
            raise ValueError(f"object {name!r} is a {kind}, which has no joint; only drawers and buttons do")
        return float(p.getJointState(body, 0, physicsClientId=self.client)[0])

    def light_button(self, name: str, lit: bool = True) -> None:
        body = self._body(name)
        kind = self._specs[name].kind
        if kind != "button":
            raise ValueError(f"object {name!r} is a {kind}, not a button")
        p.changeVisualShape(body, -1, rgbaColor=BUTTON_LIT_RGBA if lit else BUTTON_BASE_RGBA, physicsClientId=self.client)

    def grasped(self, name: str) -> bool:
        body, c, r = self._body(name), self.client, self.robot
        return all(len(p.getContactPoints(r, body, j, physicsClientId=c)) > 0 for j in FINGER_JOINTS)

    def physics_parameters(self) -> dict[str, float]:
        out = {}
        for name, obj in self._specs.items():
            if obj.kind == "box":
                info = p.getDynamicsInfo(self.bodies[name], -1, physicsClientId=self.client)
                out[f"{name}/mass"] = float(info[0])
                out[f"{name}/friction"] = float(info[1])
        # pybullet has no getter for joint damping: this is what changeDynamics was last given.
        out["damping"] = ARM_DAMPING * self._damping_scale
        return out

    def _body(self, name: str) -> int:
        try:
            return self.bodies[name]
        except (KeyError, AttributeError):
            raise KeyError(f"scene has no object {name!r}; objects: {list(self._specs) if self.scene else []}") from None

    # ------------------------------------------------------------------ rendering
    def camera_args(self, camera: str = "front") -> dict:
        """Keyword arguments of the `getCameraImage` call that `render` makes (benchmarks reuse them)."""
        if self._view is None:
            raise RuntimeError("reset() must be called before rendering")
        if camera == "front":
            view, proj = self._view, self._proj
        elif camera == "wrist":
            pos, orn = self.ee_pose()
            rot = quat_to_matrix(orn)
            view = p.computeViewMatrix(pos + rot @ WRIST_EYE, pos + rot @ WRIST_TARGET, rot[:, 0],
                                       physicsClientId=self.client)
            proj = self._wrist_proj
        else:
            raise ValueError(f"unknown camera {camera!r}; cameras: 'front', 'wrist'")
        h, w = self.image_size
        return dict(width=w, height=h, viewMatrix=view, projectionMatrix=proj, renderer=self._renderer,
                    flags=p.ER_NO_SEGMENTATION_MASK, physicsClientId=self.client, **self._light)

    def render(self, camera: str = "front") -> np.ndarray:
        h, w = self.image_size
        rgba = p.getCameraImage(**self.camera_args(camera))[2]
        return np.asarray(rgba, dtype=np.uint8).reshape(h, w, 4)[:, :, :3].copy()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for client in (self.client, self._ik_client):
            try:
                p.disconnect(physicsClientId=client)
            except p.error:
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
