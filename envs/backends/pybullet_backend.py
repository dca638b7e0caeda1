"""PyBullet implementation of `PhysicsBackend`.

Each instance owns a private DIRECT client, so several environments can share a process.
Physics runs at PHYSICS_HZ; one control period is round(PHYSICS_HZ / control_hz) sub-steps.
Determinism: the world is snapshotted (`saveState`) right after `build` and restored at the
start of every `reset`, which also clears the contact caches, before the episode's draw is
applied; overlapping pairs are sorted (`deterministicOverlappingPairs`).
"""
from __future__ import annotations

import os
import struct
import tempfile
import zlib

import numpy as np
import pybullet as p
import pybullet_data

from envs.backends.base import PhysicsBackend
from envs.rendering import gpu_present
from envs.scene import (BUTTON_BASE_HALF_HEIGHT, BUTTON_BASE_RADIUS_MARGIN, BUTTON_TRAVEL,
                        DRAWER_HANDLE_HALF_WIDTH, DRAWER_HANDLE_OFFSET, DRAWER_HANDLE_RADIUS,
                        DRAWER_TRAVEL, GRIPPER_MAX_WIDTH, HOME_JOINTS, NUM_TABLE_TEXTURES,
                        TABLE_CENTER, TABLE_HALF_EXTENTS, EpisodeConfig, ObjectSpec, SceneSpec,
                        quat_to_matrix)

PHYSICS_HZ = 240.0
SETTLE_TIME = 0.2  # seconds of simulation after re-posing, arm held at home

# Arm
ARM_JOINTS = (0, 1, 2, 3, 4, 5, 6)
FINGER_JOINTS = (9, 10)
HAND_LINK = 8
TCP_LINK = 11  # panda_grasptarget: 0.105 m along the hand's z, between the fingertip pads
ARM_FORCES = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)
ARM_POSITION_GAIN = 0.1
ARM_VELOCITY_GAIN = 1.0
ARM_DAMPING = 0.5  # nominal joint damping (N m s / rad), scaled by EpisodeConfig.damping
FINGER_FORCE = 40.0  # N per finger
FINGER_MAX_VELOCITY = 0.2  # m/s per finger
FINGER_POSITION_GAIN = 0.1
FINGER_FRICTION = 2.0
FINGER_SPINNING_FRICTION = 0.1
IK_ITERATIONS = 100
IK_THRESHOLD = 1e-5

# Fixtures
TABLE_FRICTION = 1.0
WALL = 0.01  # tray and cabinet wall thickness
DRAWER_GAP = 0.003  # clearance between the drawer and the cabinet
DRAWER_MASS = 0.5
DRAWER_DAMPING = 4.0  # N s / m, scaled by EpisodeConfig.damping
DRAWER_FRICTION_FORCE = 0.5  # N, dry friction of the slide
DRAWER_HANDLE_POST_HALF = 0.006
HANDLE_RGBA = (0.25, 0.25, 0.28, 1.0)
BUTTON_CAP_MASS = 0.05
BUTTON_SPRING_FORCE = 4.0  # N, force-limited position servo that returns the cap to 0
BUTTON_SPRING_GAIN = 0.05
BUTTON_DAMPING = 1.0  # N s / m, scaled by EpisodeConfig.damping
BUTTON_BASE_RGBA = (0.3, 0.3, 0.32, 1.0)
DEFAULT_RGBA = (0.7, 0.7, 0.7, 1.0)

# Rendering
NEAR, FAR = 0.01, 5.0
WRIST_FOVY = 70.0
WRIST_EYE = (0.06, 0.0, -0.1)  # in the TCP frame: beside the hand, above the fingertips
WRIST_TARGET = (0.0, 0.0, 0.12)  # in the TCP frame: ahead of the fingertips
LIGHT_TARGET = np.array([0.45, 0.0, 0.0])
LIGHT_AMBIENT = 0.45
LIGHT_SPECULAR = 0.05
RENDER_SHADOWS = 1

_IDENTITY_QUAT = (0.0, 0.0, 0.0, 1.0)
_QUAT_X90 = (float(np.sin(np.pi / 4)), 0.0, 0.0, float(np.cos(np.pi / 4)))  # cylinder axis z -> y


def _yaw_quat(yaw: float) -> tuple:
    return (0.0, 0.0, float(np.sin(yaw / 2)), float(np.cos(yaw / 2)))


# ----------------------------------------------------------------------------- table textures

def _write_png(path: str, rgb: np.ndarray) -> None:
    """Minimal PNG writer (8-bit RGB), written atomically."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def _texture_image(index: int, size: int = 128) -> np.ndarray:
    """Grey-level looks (tinted by the table rgba): 0 plain, 1 checker, 2 wood grain, 3 speckle."""
    v, u = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(1234 + index)
    if index == 0:
        g = np.ones((size, size))
    elif index == 1:
        g = np.where((np.floor(u * 8) + np.floor(v * 8)) % 2 == 0, 1.0, 0.72)
    elif index == 2:  # wood grain: wavy stripes with a little noise
        wobble = 0.4 * np.sin(2 * np.pi * (u * 1.3 + 0.2)) + 0.15 * np.sin(2 * np.pi * u * 4.1)
        g = 0.84 + 0.1 * np.sin(2 * np.pi * (v * 14 + wobble)) + 0.03 * rng.normal(0, 1, (size, size))
    else:
        coarse = rng.uniform(0, 1, (size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
        fine = rng.uniform(0, 1, (size, size))
        g = 0.7 + 0.15 * coarse + 0.15 * fine
    g = np.clip(g, 0.0, 1.0)
    return np.repeat((g * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _texture_files() -> list[str]:
    folder = os.path.join(tempfile.gettempdir(), "embodied_pybullet_textures_v1")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(NUM_TABLE_TEXTURES):
        path = os.path.join(folder, f"table_{i}.png")
        if not os.path.exists(path):
            _write_png(path, _texture_image(i))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- backend

class PybulletBackend(PhysicsBackend):
    name = "pybullet"

    def __init__(self, image_size=(224, 224), wrist_camera: bool = False, control_hz: float = 10.0):
        super().__init__(image_size, wrist_camera, control_hz)
        self.n_substeps = max(1, int(round(PHYSICS_HZ / control_hz)))
        self.client = p.connect(p.DIRECT)
        if self.client < 0:
            raise RuntimeError("could not start a pybullet DIRECT client")
        self._closed = False
        self._renderer = p.ER_TINY_RENDERER
        if gpu_present():
            try:  # hardware OpenGL through EGL where a GPU is present
                import pkgutil
                egl = pkgutil.get_loader("eglRenderer")
                plugin = (p.loadPlugin(egl.get_filename(), "_eglRendererPlugin", physicsClientId=self.client)
                          if egl else p.loadPlugin("eglRendererPlugin", physicsClientId=self.client))
                if plugin >= 0:
                    self._renderer = p.ER_BULLET_HARDWARE_OPENGL
            except Exception:  # pragma: no cover - depends on the machine
                pass
        self.scene: SceneSpec | None = None
        self._state_id = None

    # ------------------------------------------------------------------ building
    def build(self, scene: SceneSpec) -> None:
        if self.scene is not None:
            raise RuntimeError("build() may only be called once")
        self.scene = scene
        c = self.client
        p.resetSimulation(physicsClientId=c)
        p.setPhysicsEngineParameter(fixedTimeStep=1.0 / PHYSICS_HZ, numSubSteps=0, numSolverIterations=50,
                                    deterministicOverlappingPairs=1, physicsClientId=c)
        p.setGravity(0, 0, -9.81, physicsClientId=c)

        # Table, with one texture per look (index 0 plain white: the rgba alone).
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=TABLE_HALF_EXTENTS, physicsClientId=c)
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=TABLE_HALF_EXTENTS, physicsClientId=c)
        self.table = p.createMultiBody(0, col, vis, TABLE_CENTER, physicsClientId=c)
        p.changeDynamics(self.table, -1, lateralFriction=TABLE_FRICTION, physicsClientId=c)
        self._textures = [p.loadTexture(path, physicsClientId=c) for path in _texture_files()]

        # Arm.
        self.robot = p.loadURDF(os.path.join(pybullet_data.getDataPath(), "franka_panda/panda.urdf"),
                                basePosition=(0, 0, 0), useFixedBase=True, physicsClientId=c)
        info = [p.getJointInfo(self.robot, j, physicsClientId=c) for j in range(p.getNumJoints(self.robot, physicsClientId=c))]
        movable = [i for i in info if i[2] != p.JOINT_FIXED]
        assert [i[0] for i in movable] == list(ARM_JOINTS + FINGER_JOINTS), "unexpected panda.urdf layout"
        assert info[TCP_LINK][12] == b"panda_grasptarget"
        self._ik_lower = [i[8] for i in movable]
        self._ik_upper = [i[9] for i in movable]
        self._ik_ranges = [hi - lo for lo, hi in zip(self._ik_lower, self._ik_upper)]
        self._ik_rest = list(HOME_JOINTS) + [0.04, 0.04]
        for j in FINGER_JOINTS:
            p.changeDynamics(self.robot, j, lateralFriction=FINGER_FRICTION, spinningFriction=FINGER_SPINNING_FRICTION,
                             frictionAnchor=1, physicsClientId=c)

        # Scene objects.
        self.bodies: dict[str, int] = {}
        self._specs: dict[str, ObjectSpec] = {}
        for obj in scene.objects:
            builder = getattr(self, f"_build_{obj.kind}", None)
            if builder is None:
                raise ValueError(f"unknown object kind {obj.kind!r} for {obj.name!r}")
            self.bodies[obj.name] = builder(obj)
            self._specs[obj.name] = obj

        self._set_arm_home()
        self._damping_scale = 1.0
        self._apply_damping(1.0)
        self._state_id = p.saveState(physicsClientId=c)
        self._view = None
        self._episode = None

    def _multibody(self, mass, col, vis, links=(), base_pos=(0, 0, 0)):
        """createMultiBody with links given as dicts (mass, col, vis, pos, orn, com, parent, type, axis)."""
        c = self.client
        kw = {}
        if links:
            kw = dict(linkMasses=[l["mass"] for l in links],
                      linkCollisionShapeIndices=[l["col"] for l in links],
                      linkVisualShapeIndices=[l["vis"] for l in links],
                      linkPositions=[l["pos"] for l in links],
                      linkOrientations=[l.get("orn", _IDENTITY_QUAT) for l in links],
                      linkInertialFramePositions=[l.get("com", (0, 0, 0)) for l in links],
                      linkInertialFrameOrientations=[_IDENTITY_QUAT for _ in links],
                      linkParentIndices=[l.get("parent", 0) for l in links],
                      linkJointTypes=[l["type"] for l in links],
                      linkJointAxis=[l.get("axis", (0, 0, 1)) for l in links])
        return p.createMultiBody(mass, col, vis, base_pos, physicsClientId=c, **kw)

    def _shapes(self, parts, collision=True):
        """A compound (collision, visual) pair from parts (type, dims, pos, orn)."""
        c = self.client
        types, halves, radii, lengths, poss, orns = [], [], [], [], [], []
        for kind, dims, pos, orn in parts:
            types.append(kind)
            halves.append(dims if kind == p.GEOM_BOX else (0, 0, 0))
            radii.append(dims[0] if kind in (p.GEOM_CYLINDER, p.GEOM_SPHERE) else 0.0)
            lengths.append(2 * dims[1] if kind == p.GEOM_CYLINDER else 0.0)
            poss.append(pos)
            orns.append(orn)
        col = -1
        if collision:
            col = p.createCollisionShapeArray(types, halfExtents=halves, radii=radii, lengths=lengths,
                                              collisionFramePositions=poss, collisionFrameOrientations=orns,
                                              physicsClientId=c)
        vis = p.createVisualShapeArray(types, halfExtents=halves, radii=radii, lengths=lengths,
                                       visualFramePositions=poss, visualFrameOrientations=orns, physicsClientId=c)
        return col, vis

    def _build_box(self, obj):
        c = self.client
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=obj.size, physicsClientId=c)
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=obj.size, physicsClientId=c)
        body = p.createMultiBody(obj.mass, col, vis, (0, 0, obj.size[2]), physicsClientId=c)
        p.changeDynamics(body, -1, lateralFriction=obj.friction, physicsClientId=c)
        return body

    def _build_tray(self, obj):
        """Base frame at the centre of the floor's underside, on the table."""
        ix, iy, h = obj.size
        t = WALL
        parts = [
            (p.GEOM_BOX, (ix + t, iy + t, t / 2), (0, 0, t / 2), _IDENTITY_QUAT),
            (p.GEOM_BOX, (t / 2, iy + t, h / 2), (ix + t / 2, 0, h / 2), _IDENTITY_QUAT),
            (p.GEOM_BOX, (t / 2, iy + t, h / 2), (-ix - t / 2, 0, h / 2), _IDENTITY_QUAT),
            (p.GEOM_BOX, (ix, t / 2, h / 2), (0, iy + t / 2, h / 2), _IDENTITY_QUAT),
            (p.GEOM_BOX, (ix, t / 2, h / 2), (0, -iy - t / 2, h / 2), _IDENTITY_QUAT),
        ]
        col, vis = self._shapes(parts)
        body = self._multibody(0, col, vis)
        p.changeDynamics(body, -1, lateralFriction=obj.friction, physicsClientId=self.client)
        return body

    def _build_marker(self, obj):
        """Flat disc, base frame at its centre."""
        r, hh = obj.size
        vis = p.createVisualShape(p.GEOM_CYLINDER, radius=r, length=2 * hh, physicsClientId=self.client)
        return self._multibody(0, -1, vis)

    def _build_sphere(self, obj):
        vis = p.createVisualShape(p.GEOM_SPHERE, radius=obj.size[0], physicsClientId=self.client)
        return self._multibody(0, -1, vis)

    def _build_drawer(self, obj):
        """Cabinet (base, static, open at local -x) + drawer (link 0, prismatic along -x) +
        handle (link 1, fixed to the drawer). Base frame at the cabinet centre."""
        sx, sy, sz = obj.size
        t, g = WALL, DRAWER_GAP
        cabinet = [
            (p.GEOM_BOX, (t / 2, sy, sz), (sx - t / 2, 0, 0), _IDENTITY_QUAT),  # back
            (p.GEOM_BOX, (sx, t / 2, sz), (0, sy - t / 2, 0), _IDENTITY_QUAT),  # sides
            (p.GEOM_BOX, (sx, t / 2, sz), (0, -sy + t / 2, 0), _IDENTITY_QUAT),
            (p.GEOM_BOX, (sx, sy, t / 2), (0, 0, sz - t / 2), _IDENTITY_QUAT),  # top
            (p.GEOM_BOX, (sx, sy, t / 2), (0, 0, -sz + t / 2), _IDENTITY_QUAT),  # bottom
        ]
        cab_col, cab_vis = self._shapes(cabinet)
        # Drawer, in the cabinet frame at opening 0: front panel flush with the cabinet front.
        iy, iz = sy - t - g, sz - t - g  # inner half extents available
        depth = 2 * sx - t - g  # from the cabinet front to the back wall
        x0 = -sx  # front face
        bottom_z = -iz + t / 2
        wall_h = iz * 0.6
        drawer = [
            (p.GEOM_BOX, (t / 2, iy, iz), (x0 + t / 2, 0, 0), _IDENTITY_QUAT),  # front panel
            (p.GEOM_BOX, (depth / 2 - t / 2, iy, t / 2), (x0 + depth / 2 + t / 2, 0, bottom_z), _IDENTITY_QUAT),
            (p.GEOM_BOX, (t / 2, iy, wall_h), (x0 + depth - t / 2, 0, -iz + wall_h), _IDENTITY_QUAT),  # back
            (p.GEOM_BOX, (depth / 2, t / 2, wall_h), (x0 + depth / 2, iy - t / 2, -iz + wall_h), _IDENTITY_QUAT),
            (p.GEOM_BOX, (depth / 2, t / 2, wall_h), (x0 + depth / 2, -iy + t / 2, -iz + wall_h), _IDENTITY_QUAT),
        ]
        dr_col, dr_vis = self._shapes(drawer)
        # Handle: bar along y at x = -sx - OFFSET, two posts to the front panel at y = +-HALF_WIDTH.
        hx = -sx - DRAWER_HANDLE_OFFSET
        post_len = DRAWER_HANDLE_OFFSET / 2
        handle = [
            (p.GEOM_CYLINDER, (DRAWER_HANDLE_RADIUS, DRAWER_HANDLE_HALF_WIDTH + 0.012), (hx, 0, 0), _QUAT_X90),
            (p.GEOM_BOX, (post_len, DRAWER_HANDLE_POST_HALF, DRAWER_HANDLE_POST_HALF),
             (-sx - post_len, DRAWER_HANDLE_HALF_WIDTH, 0), _IDENTITY_QUAT),
            (p.GEOM_BOX, (post_len, DRAWER_HANDLE_POST_HALF, DRAWER_HANDLE_POST_HALF),
             (-sx - post_len, -DRAWER_HANDLE_HALF_WIDTH, 0), _IDENTITY_QUAT),
        ]
        h_col, h_vis = self._shapes(handle)
        links = [
            dict(mass=DRAWER_MASS, col=dr_col, vis=dr_vis, pos=(0, 0, 0), com=(x0 + depth / 2, 0, bottom_z),
                 parent=0, type=p.JOINT_PRISMATIC, axis=(-1, 0, 0)),
            dict(mass=0.05, col=h_col, vis=h_vis, pos=(0, 0, 0), com=(hx, 0, 0), parent=1, type=p.JOINT_FIXED),
        ]
        body = self._multibody(0, cab_col, cab_vis, links)
        c = self.client
        p.changeDynamics(body, 0, jointLowerLimit=0.0, jointUpperLimit=DRAWER_TRAVEL, physicsClientId=c)
        p.changeDynamics(body, 1, lateralFriction=1.0, physicsClientId=c)
        p.setJointMotorControl2(body, 0, p.VELOCITY_CONTROL, targetVelocity=0, force=DRAWER_FRICTION_FORCE,
                                physicsClientId=c)
        return body

    def _build_button(self, obj):
        """Static base cylinder on the table (base frame at its bottom centre) + cap (link 0)
        on a prismatic joint along z, 0 = released, sprung back by a force-limited servo."""
        r, hh = obj.size
        base_r = r + BUTTON_BASE_RADIUS_MARGIN
        col, vis = self._shapes([(p.GEOM_CYLINDER, (base_r, BUTTON_BASE_HALF_HEIGHT), (0, 0, BUTTON_BASE_HALF_HEIGHT),
                                  _IDENTITY_QUAT)])
        cap_col, cap_vis = self._shapes([(p.GEOM_CYLINDER, (r, hh), (0, 0, 0), _IDENTITY_QUAT)])
        links = [dict(mass=BUTTON_CAP_MASS, col=cap_col, vis=cap_vis, pos=(0, 0, 2 * BUTTON_BASE_HALF_HEIGHT + hh),
                      parent=0, type=p.JOINT_PRISMATIC, axis=(0, 0, 1))]
        body = self._multibody(0, col, vis, links)
        c = self.client
        p.changeDynamics(body, 0, jointLowerLimit=-BUTTON_TRAVEL, jointUpperLimit=0.0, physicsClientId=c)
        p.changeVisualShape(body, -1, rgbaColor=BUTTON_BASE_RGBA, physicsClientId=c)
        p.setJointMotorControl2(body, 0, p.POSITION_CONTROL, targetPosition=0.0, force=BUTTON_SPRING_FORCE,
                                positionGain=BUTTON_SPRING_GAIN, physicsClientId=c)
        return body

    # ------------------------------------------------------------------ reset
    def _set_arm_home(self):
        c, r = self.client, self.robot
        for j, q in zip(ARM_JOINTS, HOME_JOINTS):
            p.resetJointState(r, j, q, 0.0, physicsClientId=c)
        half = GRIPPER_MAX_WIDTH / 2
        for j in FINGER_JOINTS:
            p.resetJointState(r, j, half, 0.0, physicsClientId=c)
        self._arm_targets(list(HOME_JOINTS), 1.0)

    def _arm_targets(self, q, gripper):
        c, r = self.client, self.robot
        p.setJointMotorControlArray(r, ARM_JOINTS, p.POSITION_CONTROL, targetPositions=q, forces=ARM_FORCES,
                                    positionGains=(ARM_POSITION_GAIN,) * 7, velocityGains=(ARM_VELOCITY_GAIN,) * 7,
                                    physicsClientId=c)
        half = float(np.clip(gripper, 0.0, 1.0)) * GRIPPER_MAX_WIDTH / 2
        for j in FINGER_JOINTS:
            p.setJointMotorControl2(r, j, p.POSITION_CONTROL, targetPosition=half, force=FINGER_FORCE,
                                    positionGain=FINGER_POSITION_GAIN, maxVelocity=FINGER_MAX_VELOCITY,
                                    physicsClientId=c)

    def _apply_damping(self, scale):
        c = self.client
        self._damping_scale = float(scale)
        for j in ARM_JOINTS:
            p.changeDynamics(self.robot, j, jointDamping=ARM_DAMPING * scale, physicsClientId=c)
        for name, obj in self._specs.items():
            if obj.kind == "drawer":
                p.changeDynamics(self.bodies[name], 0, jointDamping=DRAWER_DAMPING * scale, physicsClientId=c)
            elif obj.kind == "button":
                p.changeDynamics(self.bodies[name], 0, jointDamping=BUTTON_DAMPING * scale, physicsClientId=c)

    def reset(self, episode: EpisodeConfig) -> None:
        if self.scene is None:
            raise RuntimeError("build() must be called before reset()")
        c = self.client
        p.restoreState(self._state_id, physicsClientId=c)
        self._episode = episode

        # Table look.
        tex = int(episode.table_texture) % len(self._textures)
        p.changeVisualShape(self.table, -1, rgbaColor=episode.table_rgba, textureUniqueId=self._textures[tex],
                            physicsClientId=c)

        # Objects.
        for name, obj in self._specs.items():
            body = self.bodies[name]
            if name in episode.poses:
                pos, yaw = episode.poses[name]
                p.resetBasePositionAndOrientation(body, pos, _yaw_quat(yaw), physicsClientId=c)
            rgba = episode.rgba.get(name, DEFAULT_RGBA)
            if obj.kind == "button":
                p.changeVisualShape(body, 0, rgbaColor=rgba, physicsClientId=c)
            elif obj.kind == "drawer":
                p.changeVisualShape(body, -1, rgbaColor=rgba, physicsClientId=c)
                p.changeVisualShape(body, 0, rgbaColor=rgba, physicsClientId=c)
                p.changeVisualShape(body, 1, rgbaColor=HANDLE_RGBA, physicsClientId=c)
            else:
                p.changeVisualShape(body, -1, rgbaColor=rgba, physicsClientId=c)
            if obj.kind == "box":
                p.changeDynamics(body, -1, mass=episode.mass_of(obj), lateralFriction=episode.friction_of(obj),
                                 physicsClientId=c)
            elif obj.kind == "drawer":
                q = float(np.clip(episode.joints.get(name, 0.0), 0.0, DRAWER_TRAVEL))
                p.resetJointState(body, 0, q, 0.0, physicsClientId=c)
            elif obj.kind == "button":
                q = float(np.clip(episode.joints.get(name, 0.0), -BUTTON_TRAVEL, 0.0))
                p.resetJointState(body, 0, q, 0.0, physicsClientId=c)
        self._apply_damping(episode.damping)

        # Arm at home, gripper open.
        self._set_arm_home()

        # Camera and light.
        cam = episode.camera
        h, w = self.image_size
        self._view = p.computeViewMatrix(cam.eye, cam.target, (0, 0, 1), physicsClientId=c)
        self._proj = p.computeProjectionMatrixFOV(cam.fovy_deg, w / h, NEAR, FAR, physicsClientId=c)
        self._wrist_proj = p.computeProjectionMatrixFOV(WRIST_FOVY, w / h, NEAR, FAR, physicsClientId=c)
        to_light = np.asarray(episode.light_pos, dtype=float) - LIGHT_TARGET
        self._light = dict(lightDirection=tuple(to_light / np.linalg.norm(to_light)),
                           lightColor=(1.0, 1.0, 1.0), lightDistance=float(np.linalg.norm(to_light)),
                           shadow=RENDER_SHADOWS, lightAmbientCoeff=LIGHT_AMBIENT,
                           lightDiffuseCoeff=float(episode.light_intensity), lightSpecularCoeff=LIGHT_SPECULAR)

        # Let objects settle.
        for _ in range(int(round(SETTLE_TIME * PHYSICS_HZ))):
            p.stepSimulation(physicsClientId=c)

    # ------------------------------------------------------------------ control
    def apply_action(self, target_pos, target_quat, gripper: float) -> None:
        c, r = self.client, self.robot
        q = p.calculateInverseKinematics(
            r, TCP_LINK, [float(v) for v in target_pos], [float(v) for v in target_quat],
            lowerLimits=self._ik_lower, upperLimits=self._ik_upper, jointRanges=self._ik_ranges,
            restPoses=self._ik_rest, maxNumIterations=IK_ITERATIONS, residualThreshold=IK_THRESHOLD,
            physicsClientId=c)
        self._arm_targets(q[:7], gripper)
        for _ in range(self.n_substeps):
            p.stepSimulation(physicsClientId=c)

    # ------------------------------------------------------------------ sensing
    def ee_pose(self):
        s = p.getLinkState(self.robot, TCP_LINK, computeForwardKinematics=1, physicsClientId=self.client)
        return np.array(s[4]), np.array(s[5])

    def gripper_opening(self) -> float:
        s = p.getJointStates(self.robot, FINGER_JOINTS, physicsClientId=self.client)
        return float(np.clip(s[0][0] + s[1][0], 0.0, GRIPPER_MAX_WIDTH))

    def object_pose(self, name: str):
        pos, orn = p.getBasePositionAndOrientation(self._body(name), physicsClientId=self.client)
        return np.array(pos), np.array(orn)

    def joint_position(self, name: str) -> float:
        body = self._body(name)
        if self._specs[name].kind not in ("drawer", "button"):
            raise ValueError(f"object {name!r} ({self._specs[name].kind}) has no joint")
        return float(p.getJointState(body, 0, physicsClientId=self.client)[0])

    def grasped(self, name: str) -> bool:
        body, c = self._body(name), self.client
        return all(len(p.getContactPoints(self.robot, body, j, physicsClientId=c)) > 0 for j in FINGER_JOINTS)

    def physics_parameters(self) -> dict[str, float]:
        out = {}
        for name, obj in self._specs.items():
            if obj.kind == "box":
                info = p.getDynamicsInfo(self.bodies[name], -1, physicsClientId=self.client)
                out[f"{name}/mass"] = float(info[0])
                out[f"{name}/friction"] = float(info[1])
        # pybullet has no getter for joint damping; this is the value last given to changeDynamics.
        out["damping"] = ARM_DAMPING * self._damping_scale
        return out

    def _body(self, name: str) -> int:
        try:
            return self.bodies[name]
        except KeyError:
            raise KeyError(f"scene has no object {name!r}; objects: {list(self.bodies)}") from None

    # ------------------------------------------------------------------ rendering
    def camera_args(self, camera: str = "front") -> dict:
        """Keyword arguments of the `getCameraImage` call `render` makes (also for benchmarks)."""
        h, w = self.image_size
        if camera == "front":
            view, proj = self._view, self._proj
        elif camera == "wrist":
            pos, orn = self.ee_pose()
            rot = quat_to_matrix(orn)
            eye = pos + rot @ WRIST_EYE
            target = pos + rot @ WRIST_TARGET
            view = p.computeViewMatrix(eye, target, rot[:, 0], physicsClientId=self.client)
            proj = self._wrist_proj
        else:
            raise ValueError(f"unknown camera {camera!r}; cameras: 'front', 'wrist'")
        return dict(width=w, height=h, viewMatrix=view, projectionMatrix=proj, renderer=self._renderer,
                    flags=p.ER_NO_SEGMENTATION_MASK, physicsClientId=self.client, **self._light)

    def render(self, camera: str = "front") -> np.ndarray:
        if self._view is None:
            raise RuntimeError("reset() must be called before render()")
        h, w = self.image_size
        img = p.getCameraImage(**self.camera_args(camera))[2]
        return np.asarray(img, dtype=np.uint8).reshape(h, w, 4)[:, :, :3].copy()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                p.disconnect(physicsClientId=self.client)
            except p.error:
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
