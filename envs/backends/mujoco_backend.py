"""MuJoCo backend: a Franka Panda (MJCF written here with the kinematics of pybullet_data's
`franka_panda/panda.urdf`), the table and a task's objects, driven through damped least
squares inverse kinematics and joint position actuators.

The model is generated as an MJCF string in `build`; `reset` only writes model and data
arrays (poses, colours, masses, frictions, damping, light and camera), so one compiled model
and one renderer serve every episode.
"""
from __future__ import annotations

import atexit
import os
import weakref

import numpy as np

from envs.rendering import configure_mujoco_gl

configure_mujoco_gl()
import mujoco  # noqa: E402  (MUJOCO_GL must be set before this import)

from envs.backends.base import PhysicsBackend  # noqa: E402
from envs.scene import (BUTTON_BASE_HALF_HEIGHT, BUTTON_BASE_RADIUS_MARGIN, BUTTON_LIT_RGBA, BUTTON_TRAVEL,  # noqa: E402
                        DRAWER_HANDLE_HALF_WIDTH, DRAWER_HANDLE_OFFSET, DRAWER_HANDLE_RADIUS, DRAWER_TRAVEL,
                        GRIPPER_MAX_WIDTH, HOME_JOINTS, NUM_TABLE_TEXTURES, TABLE_CENTER, TABLE_HALF_EXTENTS,
                        EpisodeConfig, ObjectSpec, SceneSpec, look_at_matrix)

TIMESTEP = 0.002
BUTTON_BASE_RGBA = (0.25, 0.25, 0.27, 1.0)
# The "discrete" integrator (MuJoCo >= 4.0) solves contacts in the same effective inertia
# M + hD + h^2K that integrates the stiff, damped position servos; with "implicitfast" the
# servo damping that the contact solver does not see makes a held object creep along the
# finger pads (about 1 cm per 20 cm lift) - with "discrete" it stays within about 1 mm.
SETTLE_TIME = 0.2  # seconds of physics after a reset, arm held at home

# -- the arm: joint origins, axes and limits of pybullet_data's franka_panda/panda.urdf ------------
_S = float(np.sqrt(0.5))
_ROLL_PLUS = (_S, _S, 0.0, 0.0)  # URDF rpy (+pi/2, 0, 0) as an MJCF quaternion (w x y z)
_ROLL_MINUS = (_S, -_S, 0.0, 0.0)  # rpy (-pi/2, 0, 0)
# (name, pos, quat, lower, upper, inertial com, mass)
ARM_LINKS = (
    ("link1", (0.0, 0.0, 0.333), (1.0, 0.0, 0.0, 0.0), -2.9671, 2.9671, (0.0, -0.04, -0.05), 2.7),
    ("link2", (0.0, 0.0, 0.0), _ROLL_MINUS, -1.8326, 1.8326, (0.0, -0.04, 0.06), 2.73),
    ("link3", (0.0, -0.316, 0.0), _ROLL_PLUS, -2.9671, 2.9671, (0.01, 0.01, -0.05), 2.04),
    ("link4", (0.0825, 0.0, 0.0), _ROLL_PLUS, -3.1416, 0.0, (-0.03, 0.03, 0.02), 2.08),
    ("link5", (-0.0825, 0.384, 0.0), _ROLL_MINUS, -2.9671, 2.9671, (0.0, 0.04, -0.12), 3.0),
    ("link6", (0.0, 0.0, 0.0), _ROLL_PLUS, -0.0873, 3.8223, (0.04, 0.0, 0.0), 1.3),
    ("link7", (0.088, 0.0, 0.0), _ROLL_PLUS, -2.9671, 2.9671, (0.0, 0.0, 0.08), 0.2),
)
ARM_INERTIA = (0.03, 0.03, 0.02, 0.02, 0.02, 0.005, 0.002)
FLANGE_OFFSET = 0.107  # link7 -> link8
HAND_QUAT = (float(np.cos(-np.pi / 8)), 0.0, 0.0, float(np.sin(-np.pi / 8)))  # rpy (0, 0, -pi/4)
FINGER_OFFSET = 0.0584  # hand -> finger joints
FINGER_TRAVEL = 0.04
TCP_OFFSET = 0.105  # hand -> tool centre point (the URDF's panda_grasptarget)

# Joint position actuators: stiffness, damping, force limit (the Panda's torque limits).
ARM_KP = (4500.0, 4500.0, 3500.0, 3500.0, 2000.0, 2000.0, 2000.0)
ARM_KV = (150.0, 200.0, 150.0, 140.0, 45.0, 45.0, 35.0)  # about critically damped
ARM_FORCE = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)
ARM_DAMPING = (1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5)  # passive joint damping, scaled by EpisodeConfig.damping
ARM_ARMATURE = 0.1
# Gripper: one position actuator on the finger separation (a fixed tendon q1 + q2), the two
# fingers coupled by an equality; its force is the squeeze of each pad.
GRIP_KP = 1500.0
GRIP_KV = 20.0
GRIP_FORCE = 40.0
FINGER_DAMPING = 20.0

# Collision geometry of the arm (capsules/boxes in link frames) - cheap and good enough.
ARM_COLLISION = {
    "link1": ('<geom type="capsule" fromto="0 0 -0.16 0 0 -0.02" size="0.06"/>',),
    "link2": ('<geom type="capsule" fromto="0 0 0 0 -0.15 0" size="0.06"/>',),
    "link3": ('<geom type="capsule" fromto="0 0 -0.1 0 0 0" size="0.06"/>',),
    "link4": ('<geom type="capsule" fromto="0 0 0 -0.08 0.0 0" size="0.06"/>',
              '<geom type="capsule" fromto="-0.08 0 0 -0.08 0.1 0" size="0.055"/>'),
    "link5": ('<geom type="capsule" fromto="0 0 -0.22 0 0 -0.02" size="0.055"/>',),
    "link6": ('<geom type="capsule" fromto="0 0 0 0.088 0 0" size="0.05"/>',),
    "link7": ('<geom type="cylinder" fromto="0 0 0.05 0 0 0.105" size="0.045"/>',),
    "hand": ('<geom type="box" pos="0 0 0.01" size="0.032 0.104 0.02"/>',
             '<geom type="box" pos="0 0 0.046" size="0.02 0.1 0.016"/>'),
}
ROBOT_WHITE = "0.93 0.93 0.92 1"
ROBOT_DARK = "0.22 0.22 0.24 1"

# Contacts: every robot geom has contype 2 / conaffinity 1, the scene has 1 / 1, so the robot
# touches the scene but not itself.
PAD_FRICTION = 1.5
WRIST_CAMERA_FOVY = 75.0
TABLE_TEXTURE_SIZE = 256
# Rendering quality. Shadow maps and multisampling cost 5-15x the render time on a CPU (OSMesa)
# for little benefit at policy resolutions, so both are off.
SHADOW_SIZE = 0
MULTISAMPLES = 0


def _fmt(values) -> str:
    return " ".join(f"{float(v):.9g}" for v in values)


_OPEN_BACKENDS: "weakref.WeakSet[MujocoBackend]" = weakref.WeakSet()


@atexit.register
def _close_renderers() -> None:
    # A renderer left to the garbage collector at interpreter exit fails noisily in its GL
    # teardown (the GL bindings are gone by then), so close the open ones first.
    for backend in list(_OPEN_BACKENDS):
        backend.close()


def _mesh_dir() -> str | None:
    try:
        import pybullet_data
    except ImportError:
        return None
    path = os.path.join(pybullet_data.getDataPath(), "franka_panda", "meshes", "collision")
    return path if os.path.isfile(os.path.join(path, "link1.obj")) else None


def _wxyz_to_xyzw(q) -> np.ndarray:
    return np.array([q[1], q[2], q[3], q[0]])


def _yaw_wxyz(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def _table_textures() -> list[np.ndarray]:
    """Three grey procedural patterns (H, W, 3 uint8), tinted by the table colour at render time.
    Generated from fixed seeds, so every build gets the same pixels."""
    n = TABLE_TEXTURE_SIZE
    y, x = np.mgrid[0:n, 0:n] / n
    rng = np.random.default_rng(20240611)
    # 1: checker tiles with thin dark joints
    tiles = ((np.floor(x * 2) + np.floor(y * 2)) % 2) * 0.2 + 0.8
    joints = (np.minimum(x * 2 % 1, y * 2 % 1) < 0.015)
    checker = np.where(joints, 0.55, tiles)
    # 2: wood grain: wavy stripes along x with fine noise
    noise = rng.normal(0.0, 1.0, (n, n))
    walk = np.cumsum(rng.normal(0.0, 1.0, n))
    smooth = (walk - np.linspace(0.0, walk[-1], n)) / np.sqrt(n)  # periodic, so the tiles join
    grain = 0.8 + 0.12 * np.sin(2 * np.pi * (y * 9 + 0.35 * smooth[None, :] + 0.05 * np.sin(2 * np.pi * x * 3)))
    grain += 0.04 * np.sin(2 * np.pi * y * 57) + 0.025 * noise
    # 3: granite: blurred noise plus dark and light speckles
    coarse = rng.normal(0.0, 1.0, (n // 8, n // 8))
    coarse = np.kron(coarse, np.ones((8, 8)))
    for axis in (0, 1):
        coarse = (coarse + np.roll(coarse, 3, axis) + np.roll(coarse, -3, axis) + np.roll(coarse, 6, axis)) / 4
    speck = rng.random((n, n))
    granite = 0.82 + 0.06 * coarse + 0.03 * noise
    granite = np.where(speck < 0.04, 0.45, np.where(speck > 0.97, 1.0, granite))
    out = []
    for pattern in (checker, grain, granite):
        grey = (np.clip(pattern, 0.0, 1.0) * 255).astype(np.uint8)
        out.append(np.repeat(grey[:, :, None], 3, axis=2))
    return out


class MujocoBackend(PhysicsBackend):
    name = "mujoco"

    def __init__(self, image_size: tuple[int, int] = (224, 224), wrist_camera: bool = False,
                 control_hz: float = 10.0):
        super().__init__(image_size, wrist_camera, control_hz)
        self.model: mujoco.MjModel | None = None
        self.data: mujoco.MjData | None = None
        self.scene: SceneSpec | None = None
        self._renderer: mujoco.Renderer | None = None
        self.substeps = max(1, int(round(1.0 / (control_hz * TIMESTEP))))

    # ------------------------------------------------------------------------------------------
    # model
    # ------------------------------------------------------------------------------------------
    def _robot_xml(self, mesh_dir: str | None) -> tuple[str, str]:
        """(assets, worldbody) MJCF for the arm and the gripper."""
        assets = []
        if mesh_dir is not None:
            for mesh in ("link0", "link1", "link2", "link3", "link4", "link5", "link6", "link7", "hand", "finger"):
                assets.append(f'<mesh name="panda_{mesh}" file="{os.path.join(mesh_dir, mesh + ".obj")}"/>')

        def visual(mesh: str, rgba: str = ROBOT_WHITE, extra: str = "") -> str:
            if mesh_dir is None:
                return ""
            return f'<geom class="robot_visual" mesh="panda_{mesh}" rgba="{rgba}" {extra}/>'

        collision_class = "robot_collision" if mesh_dir is not None else "robot_collision_visible"
        xml = [f'<body name="link0">{visual("link0")}'
               + ('' if mesh_dir is not None else
                  '<geom class="robot_collision_visible" type="cylinder" pos="0 0 0.07" size="0.09 0.07"/>')]
        for i, (name, pos, quat, lo, hi, com, mass) in enumerate(ARM_LINKS):
            inertia = ARM_INERTIA[i]
            xml.append(f'<body name="{name}" pos="{_fmt(pos)}" quat="{_fmt(quat)}" gravcomp="1">')
            xml.append(f'<inertial pos="{_fmt(com)}" mass="{mass}" diaginertia="{inertia} {inertia} {inertia}"/>')
            xml.append(f'<joint name="joint{i + 1}" class="arm" range="{lo} {hi}" damping="{ARM_DAMPING[i]}"/>')
            xml.append(visual(name, ROBOT_DARK if name == "link7" else ROBOT_WHITE))
            for geom in ARM_COLLISION[name]:
                xml.append(geom.replace("<geom ", f'<geom class="{collision_class}" '))
        # hand (URDF link8 + panda_hand), TCP site, wrist camera and the two fingers
        cam_pos = np.array([0.07, 0.0, 0.035])
        look = np.array([0.0, 0.0, TCP_OFFSET + 0.06]) - cam_pos
        fwd = look / np.linalg.norm(look)
        up = np.array([1.0, 0.0, 0.0]) - fwd * fwd[0]
        up /= np.linalg.norm(up)
        right = np.cross(fwd, up)
        cam_quat = np.zeros(4)
        mujoco.mju_mat2Quat(cam_quat, np.stack([right, up, -fwd], axis=1).ravel())
        xml.append(f'<body name="hand" pos="0 0 {FLANGE_OFFSET}" quat="{_fmt(HAND_QUAT)}" gravcomp="1">')
        xml.append('<inertial pos="0 0 0.04" mass="0.81" diaginertia="0.003 0.003 0.002"/>')
        xml.append(visual("hand"))
        for geom in ARM_COLLISION["hand"]:
            xml.append(geom.replace("<geom ", f'<geom class="{collision_class}" '))
        xml.append(f'<site name="tcp" pos="0 0 {TCP_OFFSET}" size="0.005" group="5"/>')
        xml.append(f'<camera name="wrist" pos="{_fmt(cam_pos)}" quat="{_fmt(cam_quat)}" fovy="{WRIST_CAMERA_FOVY}"/>')
        for side, sign in (("left", 1.0), ("right", -1.0)):
            mesh_rot = "" if sign > 0 else 'euler="0 0 3.14159265359"'
            xml.append(f'<body name="{side}_finger" pos="0 0 {FINGER_OFFSET}" gravcomp="1">')
            xml.append(f'<inertial pos="0 {0.01 * sign} 0.02" mass="0.1" diaginertia="2e-5 2e-5 1e-5"/>')
            xml.append(f'<joint name="{side}_finger" type="slide" axis="0 {sign} 0" range="0 {FINGER_TRAVEL}" '
                       f'damping="{FINGER_DAMPING}" armature="0.01"/>')
            xml.append(visual("finger", ROBOT_DARK, mesh_rot))
            # finger (a thick base, a tapered middle, kept clear of the pad plane) and the
            # fingertip pad, inner face at y = 0; the URDF finger mesh is 26 mm thick at the
            # base and 14 mm at the tip
            xml.append(f'<geom class="{collision_class}" type="box" pos="0 {0.0145 * sign} 0.01" '
                       f'size="0.0105 0.0115 0.01"/>')
            xml.append(f'<geom class="{collision_class}" type="box" pos="0 {0.0105 * sign} 0.0275" '
                       f'size="0.0085 0.0075 0.0075"/>')  # narrower than the pad: never leads a push
            pad_class = "pad" if mesh_dir is not None else "pad_visible"
            xml.append(f'<geom name="{side}_pad" class="{pad_class}" pos="0 {0.007 * sign} 0.0445" '
                       f'size="0.009 0.007 0.0095"/>')
            xml.append('</body>')
        xml.append('</body>')  # hand
        xml.append('</body>' * len(ARM_LINKS))
        xml.append('</body>')  # link0
        return "\n".join(assets), "\n".join(xml)

    def _object_xml(self, obj: ObjectSpec) -> str:
        """A scene object at the origin; `reset` moves it. Geom/body names start with the object name."""
        n = obj.name
        s = obj.size
        if obj.kind == "box":
            return (f'<body name="{n}"><freejoint name="{n}"/>'
                    f'<geom name="{n}" class="object" type="box" size="{_fmt(s)}" mass="{obj.mass}"/></body>')
        if obj.kind == "tray":
            ix, iy, h = s
            t = 0.01
            return (f'<body name="{n}">'
                    f'<geom name="{n}/floor" class="object" type="box" pos="0 0 {t / 2}" size="{ix + t} {iy + t} {t / 2}"/>'
                    f'<geom name="{n}/wall_px" class="object" type="box" pos="{ix + t / 2} 0 {h / 2}" size="{t / 2} {iy + t} {h / 2}"/>'
                    f'<geom name="{n}/wall_nx" class="object" type="box" pos="{-ix - t / 2} 0 {h / 2}" size="{t / 2} {iy + t} {h / 2}"/>'
                    f'<geom name="{n}/wall_py" class="object" type="box" pos="0 {iy + t / 2} {h / 2}" size="{ix} {t / 2} {h / 2}"/>'
                    f'<geom name="{n}/wall_ny" class="object" type="box" pos="0 {-iy - t / 2} {h / 2}" size="{ix} {t / 2} {h / 2}"/>'
                    '</body>')
        if obj.kind == "marker":
            return f'<body name="{n}"><geom name="{n}" class="visual_only" type="cylinder" size="{s[0]} {s[1]}"/></body>'
        if obj.kind == "sphere":
            return f'<body name="{n}"><geom name="{n}" class="visual_only" type="sphere" size="{s[0]}"/></body>'
        if obj.kind == "drawer":
            sx, sy, sz = s
            t = 0.01
            gap = 0.003
            depth = 2 * sx - 2 * t - 0.005  # drawer box length along x
            inner_y = sy - t - gap
            side_h = 0.5 * (sz - t) + 0.25 * (sz - t)  # half height of the drawer box sides
            bottom_z = -sz + t + gap + t / 2
            side_z = bottom_z - t / 2 + side_h
            cx = -sx + t + depth / 2
            hx = -sx - DRAWER_HANDLE_OFFSET
            hw = DRAWER_HANDLE_HALF_WIDTH
            return (f'<body name="{n}">'
                    f'<geom name="{n}/top" class="object" type="box" pos="0 0 {sz - t / 2}" size="{sx} {sy} {t / 2}"/>'
                    f'<geom name="{n}/bottom" class="object" type="box" pos="0 0 {-sz + t / 2}" size="{sx} {sy} {t / 2}"/>'
                    f'<geom name="{n}/side_py" class="object" type="box" pos="0 {sy - t / 2} 0" size="{sx} {t / 2} {sz - t}"/>'
                    f'<geom name="{n}/side_ny" class="object" type="box" pos="0 {-sy + t / 2} 0" size="{sx} {t / 2} {sz - t}"/>'
                    f'<geom name="{n}/back" class="object" type="box" pos="{sx - t / 2} 0 0" size="{t / 2} {sy - t} {sz - t}"/>'
                    f'<body name="{n}/drawer">'
                    f'<inertial pos="{cx} 0 {bottom_z}" mass="{obj.mass}" diaginertia="1e-3 1e-3 1e-3"/>'
                    f'<joint name="{n}" type="slide" axis="-1 0 0" range="0 {DRAWER_TRAVEL}" damping="8" solreflimit="0.004 1"/>'
                    f'<geom name="{n}/front" class="object" type="box" pos="{-sx + t / 2} 0 0" size="{t / 2} {inner_y} {sz - t - gap}"/>'
                    f'<geom name="{n}/floor" class="object" type="box" pos="{cx} 0 {bottom_z}" size="{depth / 2} {inner_y} {t / 2}"/>'
                    f'<geom name="{n}/wall_py" class="object" type="box" pos="{cx} {inner_y - t / 2} {side_z}" size="{depth / 2} {t / 2} {side_h}"/>'
                    f'<geom name="{n}/wall_ny" class="object" type="box" pos="{cx} {-inner_y + t / 2} {side_z}" size="{depth / 2} {t / 2} {side_h}"/>'
                    f'<geom name="{n}/wall_back" class="object" type="box" pos="{-sx + t + depth - t / 2} 0 {side_z}" size="{t / 2} {inner_y} {side_h}"/>'
                    f'<geom name="{n}/post_py" class="object" type="capsule" fromto="{-sx} {hw} 0 {hx} {hw} 0" size="0.005"/>'
                    f'<geom name="{n}/post_ny" class="object" type="capsule" fromto="{-sx} {-hw} 0 {hx} {-hw} 0" size="0.005"/>'
                    f'<geom name="{n}/handle" class="object" type="capsule" fromto="{hx} {-hw - 0.01} 0 {hx} {hw + 0.01} 0" size="{DRAWER_HANDLE_RADIUS}"/>'
                    '</body></body>')
        if obj.kind == "button":
            r, h = s
            base_r = r + BUTTON_BASE_RADIUS_MARGIN
            bh = BUTTON_BASE_HALF_HEIGHT
            stiffness = 300.0
            return (f'<body name="{n}">'
                    f'<geom name="{n}/base" class="object" type="cylinder" pos="0 0 {bh}" size="{base_r} {bh}"/>'
                    f'<body name="{n}/cap" pos="0 0 {2 * bh + h}">'
                    f'<inertial pos="0 0 0" mass="{obj.mass}" diaginertia="1e-4 1e-4 1e-4"/>'
                    f'<joint name="{n}" type="slide" axis="0 0 1" range="{-BUTTON_TRAVEL} 0" stiffness="{stiffness}" '
                    f'springref="0.005" damping="3" solreflimit="0.004 1"/>'
                    f'<geom name="{n}/cap" class="object" type="cylinder" size="{r} {h}"/>'
                    '</body></body>')
        raise ValueError(f"object {obj.name!r}: unknown kind {obj.kind!r}; valid kinds: box, tray, marker, sphere, "
                         "drawer, button")

    def _xml(self, scene: SceneSpec, integrator: str = "discrete") -> str:
        mesh_dir = _mesh_dir()
        robot_assets, robot = self._robot_xml(mesh_dir)
        h, w = self.image_size
        tex = TABLE_TEXTURE_SIZE
        objects = "\n".join(self._object_xml(o) for o in scene.objects)
        excludes = []
        for o in scene.objects:
            if o.kind == "drawer":
                excludes.append(f'<exclude body1="{o.name}" body2="{o.name}/drawer"/>')
            elif o.kind == "button":
                excludes.append(f'<exclude body1="{o.name}" body2="{o.name}/cap"/>')
        table_materials = ['<material name="table_0" rgba="1 1 1 1" specular="0.1" shininess="0.1"/>']
        for i in range(1, NUM_TABLE_TEXTURES):
            table_materials.append(f'<texture name="table_tex_{i}" type="2d" builtin="flat" rgb1="1 1 1" '
                                   f'width="{tex}" height="{tex}"/>')
            table_materials.append(f'<material name="table_{i}" texture="table_tex_{i}" texrepeat="2 2" '
                                   'texuniform="true" rgba="1 1 1 1" specular="0.1" shininess="0.1"/>')
        return f"""
<mujoco model="embodied_tabletop">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{TIMESTEP}" integrator="{integrator}" cone="elliptic" impratio="10"/>
  <statistic center="0.3 0 0.2" extent="1.0"/>
  <visual>
    <global offwidth="{max(w, 640)}" offheight="{max(h, 480)}"/>
    <quality shadowsize="{SHADOW_SIZE}" offsamples="{MULTISAMPLES}"/>
    <map znear="0.01" zfar="30"/>
    <headlight ambient="0.3 0.3 0.3" diffuse="0 0 0" specular="0 0 0"/>
  </visual>
  <default>
    <geom solref="0.01 1" solimp="0.95 0.99 0.001"/>
    <default class="arm"><joint type="hinge" axis="0 0 1" armature="{ARM_ARMATURE}"/></default>
    <default class="robot_visual"><geom type="mesh" contype="0" conaffinity="0" group="1" mass="0"/></default>
    <default class="robot_collision"><geom contype="2" conaffinity="1" group="3" mass="0" rgba="0.9 0.9 0.9 1"/></default>
    <default class="robot_collision_visible"><geom contype="2" conaffinity="1" group="1" mass="0" rgba="0.9 0.9 0.9 1"/></default>
    <default class="pad"><geom type="box" contype="2" conaffinity="1" group="3" mass="0" condim="4"
        friction="{PAD_FRICTION} 0.02 0.0001" rgba="0.2 0.2 0.2 1"/></default>
    <default class="pad_visible"><geom type="box" contype="2" conaffinity="1" group="1" mass="0" condim="4"
        friction="{PAD_FRICTION} 0.02 0.0001" rgba="0.2 0.2 0.2 1"/></default>
    <default class="object"><geom contype="1" conaffinity="1" condim="4" friction="1 0.005 0.0001" group="0"/></default>
    <default class="visual_only"><geom contype="0" conaffinity="0" group="0" mass="0"/></default>
  </default>
  <asset>
    <texture name="sky" type="skybox" builtin="gradient" rgb1="0.78 0.8 0.82" rgb2="0.42 0.44 0.48" width="32" height="192"/>
    {robot_assets}
    {chr(10).join(table_materials)}
  </asset>
  <worldbody>
    <light name="key" type="spot" pos="0.6 0 1.6" dir="0 0 -1" cutoff="70" exponent="1" diffuse="0.7 0.7 0.7"
           specular="0.2 0.2 0.2" castshadow="{str(SHADOW_SIZE > 0).lower()}"/>
    <camera name="front" pos="1.25 0 0.75" quat="1 0 0 0" fovy="45"/>
    <geom name="floor" type="plane" pos="0 0 -0.75" size="4 4 0.1" rgba="0.45 0.45 0.47 1" contype="0" conaffinity="0"/>
    <geom name="table" type="box" pos="{_fmt(TABLE_CENTER)}" size="{_fmt(TABLE_HALF_EXTENTS)}" material="table_0"
          contype="1" conaffinity="1" condim="3" friction="1 0.005 0.0001"/>
    {robot}
    {objects}
  </worldbody>
  <tendon>
    <fixed name="grip"><joint joint="left_finger" coef="1"/><joint joint="right_finger" coef="1"/></fixed>
  </tendon>
  <equality>
    <joint joint1="left_finger" joint2="right_finger" polycoef="0 1 0 0 0" solref="0.005 1" solimp="0.95 0.99 0.001"/>
  </equality>
  <contact>
    <exclude body1="left_finger" body2="right_finger"/>
    {chr(10).join(excludes)}
  </contact>
  <actuator>
    {chr(10).join(f'<position name="a{i + 1}" joint="joint{i + 1}" kp="{ARM_KP[i]}" kv="{ARM_KV[i]}" forcerange="{-ARM_FORCE[i]} {ARM_FORCE[i]}" ctrlrange="{ARM_LINKS[i][3]} {ARM_LINKS[i][4]}"/>' for i in range(7))}
    <position name="grip" tendon="grip" kp="{GRIP_KP}" kv="{GRIP_KV}" forcerange="{-GRIP_FORCE} {GRIP_FORCE}" ctrlrange="0 {GRIPPER_MAX_WIDTH}"/>
  </actuator>
</mujoco>
"""

    def build(self, scene: SceneSpec) -> None:
        if self.model is not None:
            raise RuntimeError("build() may only be called once")
        names = [o.name for o in scene.objects]
        if len(set(names)) != len(names):
            raise ValueError(f"object names must be unique; got {names}")
        self.scene = scene
        try:
            self.xml = self._xml(scene)
            m = self.model = mujoco.MjModel.from_xml_string(self.xml)
        except ValueError as err:  # MuJoCo before 4.0 has no discrete-time integrator
            if "discrete" not in str(err) and "integrator" not in str(err):
                raise
            self.xml = self._xml(scene, integrator="implicitfast")
            m = self.model = mujoco.MjModel.from_xml_string(self.xml)
        self.data = mujoco.MjData(m)
        self._ik_data = mujoco.MjData(m)
        obj_id = lambda kind, name: mujoco.mj_name2id(m, kind, name)  # noqa: E731

        # robot indices: the arm is the first body tree, so its joints are qpos/dof 0..6, fingers 7, 8
        self._arm_qpos = np.array([m.jnt_qposadr[obj_id(mujoco.mjtObj.mjOBJ_JOINT, f"joint{i}")] for i in range(1, 8)])
        assert np.array_equal(self._arm_qpos, np.arange(7))
        self._finger_qpos = np.array([m.jnt_qposadr[obj_id(mujoco.mjtObj.mjOBJ_JOINT, f"{s}_finger")]
                                      for s in ("left", "right")])
        self._arm_lo = m.jnt_range[:7, 0] + 1e-3
        self._arm_hi = m.jnt_range[:7, 1] - 1e-3
        self._home = np.array(HOME_JOINTS, dtype=np.float64)
        self._tcp = obj_id(mujoco.mjtObj.mjOBJ_SITE, "tcp")
        self._grip_act = obj_id(mujoco.mjtObj.mjOBJ_ACTUATOR, "grip")
        self._front_cam = obj_id(mujoco.mjtObj.mjOBJ_CAMERA, "front")
        self._wrist_cam = obj_id(mujoco.mjtObj.mjOBJ_CAMERA, "wrist")
        self._light = obj_id(mujoco.mjtObj.mjOBJ_LIGHT, "key")
        self._table_geom = obj_id(mujoco.mjtObj.mjOBJ_GEOM, "table")
        self._table_mats = np.array([obj_id(mujoco.mjtObj.mjOBJ_MATERIAL, f"table_{i}") for i in range(NUM_TABLE_TEXTURES)])
        self._arm_damping = m.dof_damping[:7].copy()
        for i, image in enumerate(_table_textures(), start=1):
            tex = obj_id(mujoco.mjtObj.mjOBJ_TEXTURE, f"table_tex_{i}")
            adr, size = m.tex_adr[tex], m.tex_height[tex] * m.tex_width[tex] * m.tex_nchannel[tex]
            assert m.tex_nchannel[tex] == 3 and size == image.size
            m.tex_data[adr:adr + size] = image.ravel()

        body_of = lambda name: obj_id(mujoco.mjtObj.mjOBJ_BODY, name)  # noqa: E731
        finger_bodies = [body_of("left_finger"), body_of("right_finger")]
        self._left_geom = m.geom_bodyid == finger_bodies[0]
        self._right_geom = m.geom_bodyid == finger_bodies[1]

        # per object: its root body, its geoms, movable body/dof, nominal values
        self._objects: dict[str, dict] = {}
        for obj in scene.objects:
            root = body_of(obj.name)
            info = {"spec": obj, "kind": obj.kind, "body": root}
            subtree = [b for b in range(m.nbody) if b == root or m.body_parentid[b] == root]
            geoms = np.flatnonzero(np.isin(m.geom_bodyid, subtree))
            info["geoms"] = geoms
            info["geom_mask"] = np.isin(np.arange(m.ngeom), geoms)
            if obj.kind in ("box", "drawer", "button"):
                jnt = obj_id(mujoco.mjtObj.mjOBJ_JOINT, obj.name)
                info["qpos"] = int(m.jnt_qposadr[jnt])
                info["dof"] = int(m.jnt_dofadr[jnt])
                info["jnt"] = jnt
                moving = m.jnt_bodyid[jnt]
                info["moving_body"] = moving
                info["mass0"] = float(m.body_mass[moving])
                info["inertia0"] = m.body_inertia[moving].copy()
                info["damping0"] = float(m.dof_damping[info["dof"]])
            if obj.kind == "drawer":
                info["handle_geoms"] = np.array([obj_id(mujoco.mjtObj.mjOBJ_GEOM, f"{obj.name}/{g}")
                                                 for g in ("handle", "post_py", "post_ny")])
            if obj.kind == "button":
                info["base_geom"] = obj_id(mujoco.mjtObj.mjOBJ_GEOM, f"{obj.name}/base")
            self._objects[obj.name] = info

        # scratch arrays for IK
        self._jacp = np.zeros((3, m.nv))
        self._jacr = np.zeros((3, m.nv))
        self._jac = np.zeros((6, 7))
        self._err = np.zeros(6)
        self._quat_cur = np.zeros(4)
        self._quat_inv = np.zeros(4)
        self._quat_err = np.zeros(4)
        self._rot_err = np.zeros(3)
        self._quat_out = np.zeros(4)
        self._eye6 = np.eye(6)
        self._eye7 = np.eye(7)
        self._reset_called = False
        self.ik_iterations = 0

    # ------------------------------------------------------------------------------------------
    # episodes
    # ------------------------------------------------------------------------------------------
    def _require_built(self) -> None:
        if self.model is None:
            raise RuntimeError("call build(scene) first")

    def reset(self, episode: EpisodeConfig) -> None:
        self._require_built()
        m, d = self.model, self.data
        missing = [name for name in self._objects if name not in episode.poses]
        if missing:
            raise KeyError(f"EpisodeConfig.poses lacks object(s) {missing}; the scene has {list(self._objects)}")
        mujoco.mj_resetData(m, d)

        # table and lighting
        mat = int(self._table_mats[int(episode.table_texture) % NUM_TABLE_TEXTURES])
        m.geom_matid[self._table_geom] = mat
        m.mat_rgba[mat] = episode.table_rgba
        light_pos = np.asarray(episode.light_pos, dtype=np.float64)
        m.light_pos[self._light] = light_pos
        to_table = np.array([0.45, 0.0, 0.0]) - light_pos
        m.light_dir[self._light] = to_table / np.linalg.norm(to_table)
        intensity = float(episode.light_intensity)
        m.light_diffuse[self._light] = (intensity, intensity, intensity)
        m.light_specular[self._light] = (0.3 * intensity,) * 3

        # camera
        cam = episode.camera
        m.cam_pos[self._front_cam] = cam.eye
        quat = np.zeros(4)
        mujoco.mju_mat2Quat(quat, np.ascontiguousarray(look_at_matrix(cam.eye, cam.target)).ravel())
        m.cam_quat[self._front_cam] = quat
        m.cam_fovy[self._front_cam] = float(cam.fovy_deg)

        # arm at home, gripper open
        d.qpos[:7] = self._home
        d.qpos[self._finger_qpos] = FINGER_TRAVEL
        d.ctrl[:7] = self._home
        d.ctrl[self._grip_act] = GRIPPER_MAX_WIDTH
        m.dof_damping[:7] = self._arm_damping * float(episode.damping)

        # objects
        for name, info in self._objects.items():
            obj: ObjectSpec = info["spec"]
            pos, yaw = episode.poses[name]
            pos = np.asarray(pos, dtype=np.float64)
            quat = _yaw_wxyz(float(yaw))
            rgba = np.asarray(episode.rgba.get(name, (0.6, 0.6, 0.6, 1.0)), dtype=np.float32)
            geoms = info["geoms"]
            m.geom_rgba[geoms] = rgba
            m.geom_friction[geoms, 0] = episode.friction_of(obj)
            kind = info["kind"]
            if kind == "box":
                adr = info["qpos"]
                d.qpos[adr:adr + 3] = pos
                d.qpos[adr + 3:adr + 7] = quat
            else:
                m.body_pos[info["body"]] = pos
                m.body_quat[info["body"]] = quat
            if "mass0" in info:
                scale = episode.mass_of(obj) / obj.mass if obj.mass > 0 else 1.0
                m.body_mass[info["moving_body"]] = info["mass0"] * scale
                m.body_inertia[info["moving_body"]] = info["inertia0"] * scale
            if kind in ("drawer", "button"):
                m.dof_damping[info["dof"]] = info["damping0"] * float(episode.damping)
                lo, hi = m.jnt_range[info["jnt"]]
                d.qpos[info["qpos"]] = float(np.clip(episode.joints.get(name, 0.0), lo, hi))
            if kind == "drawer":
                dark = np.concatenate([rgba[:3] * 0.45, rgba[3:]])
                m.geom_rgba[info["handle_geoms"]] = dark
            if kind == "button":
                m.geom_rgba[info["base_geom"]] = BUTTON_BASE_RGBA

        mujoco.mj_forward(m, d)
        settle = max(1, int(round(SETTLE_TIME / TIMESTEP)))
        mujoco.mj_step(m, d, nstep=settle)
        self._refresh()
        self._reset_called = True

    def _refresh(self) -> None:
        """Positions of bodies, sites and cameras consistent with the current qpos."""
        mujoco.mj_kinematics(self.model, self.data)
        mujoco.mj_camlight(self.model, self.data)

    # ------------------------------------------------------------------------------------------
    # control
    # ------------------------------------------------------------------------------------------
    def _solve_ik(self, target_pos: np.ndarray, target_quat_wxyz: np.ndarray,
                  iterations: int = 20, rot_weight: float = 0.5, damping: float = 0.02,
                  nullspace_gain: float = 0.05) -> np.ndarray:
        m, d = self.model, self._ik_data
        q = self.data.qpos[:7].copy()
        jac, err = self._jac, self._err
        qc, qi, qe, re = self._quat_cur, self._quat_inv, self._quat_err, self._rot_err
        lam2 = damping * damping * self._eye6
        for _ in range(iterations):
            d.qpos[:7] = q
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            err[:3] = target_pos - d.site_xpos[self._tcp]
            mujoco.mju_mat2Quat(qc, d.site_xmat[self._tcp])
            mujoco.mju_negQuat(qi, qc)
            mujoco.mju_mulQuat(qe, target_quat_wxyz, qi)
            if qe[0] < 0:
                qe *= -1
            mujoco.mju_quat2Vel(re, qe, 1.0)
            err[3:] = rot_weight * re
            if err[:3] @ err[:3] < 2.5e-9 and re @ re < 2.5e-7:  # 0.05 mm, 0.03 deg
                break
            self.ik_iterations += 1
            mujoco.mj_jacSite(m, d, self._jacp, self._jacr, self._tcp)
            jac[:3] = self._jacp[:, :7]
            jac[3:] = rot_weight * self._jacr[:, :7]
            jpinv = jac.T @ np.linalg.inv(jac @ jac.T + lam2)
            dq = jpinv @ err
            dq += (self._eye7 - jpinv @ jac) @ (nullspace_gain * (self._home - q))
            biggest = np.abs(dq).max()
            if biggest > 0.3:
                dq *= 0.3 / biggest
            q = np.clip(q + dq, self._arm_lo, self._arm_hi)
        return q

    def apply_action(self, target_pos: np.ndarray, target_quat: np.ndarray, gripper: float) -> None:
        if not self._reset_called:
            raise RuntimeError("call reset(episode) before apply_action")
        target_pos = np.asarray(target_pos, dtype=np.float64)
        tq = np.asarray(target_quat, dtype=np.float64)
        norm = np.sqrt(tq @ tq)
        if target_pos.shape != (3,) or tq.shape != (4,) or not np.isfinite(norm) or norm < 1e-9 \
                or not np.all(np.isfinite(target_pos)):
            raise ValueError(f"target_pos must be finite (3,) and target_quat a finite non-zero xyzw (4,); "
                             f"got {target_pos!r}, {target_quat!r}")
        quat_wxyz = np.array([tq[3], tq[0], tq[1], tq[2]]) / norm
        q = self._solve_ik(target_pos, quat_wxyz)
        d = self.data
        d.ctrl[:7] = q
        d.ctrl[self._grip_act] = min(max(float(gripper), 0.0), 1.0) * GRIPPER_MAX_WIDTH
        mujoco.mj_step(self.model, d, nstep=self.substeps)
        self._refresh()

    # ------------------------------------------------------------------------------------------
    # sensing
    # ------------------------------------------------------------------------------------------
    def ee_pose(self) -> tuple[np.ndarray, np.ndarray]:
        self._require_built()
        mujoco.mju_mat2Quat(self._quat_out, self.data.site_xmat[self._tcp])
        q = _wxyz_to_xyzw(self._quat_out)
        return self.data.site_xpos[self._tcp].copy(), q if q[3] >= 0 else -q

    def gripper_opening(self) -> float:
        self._require_built()
        return float(np.clip(self.data.qpos[self._finger_qpos].sum(), 0.0, GRIPPER_MAX_WIDTH))

    def _info(self, name: str) -> dict:
        try:
            return self._objects[name]
        except KeyError:
            raise KeyError(f"scene has no object {name!r}; objects: {list(self._objects)}") from None

    def object_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        self._require_built()
        info = self._info(name)
        if info["kind"] == "box":
            adr = info["qpos"]
            q = self.data.qpos[adr + 3:adr + 7]
            q = _wxyz_to_xyzw(q / np.linalg.norm(q))
            return self.data.qpos[adr:adr + 3].copy(), q if q[3] >= 0 else -q
        body = info["body"]
        return self.data.xpos[body].copy(), _wxyz_to_xyzw(self.data.xquat[body])

    def joint_position(self, name: str) -> float:
        self._require_built()
        info = self._info(name)
        if info["kind"] not in ("drawer", "button"):
            raise ValueError(f"object {name!r} is a {info['kind']}; only drawers and buttons have a joint")
        lo, hi = self.model.jnt_range[info["jnt"]]  # limits are soft: hide sub-millimetre overshoot
        return float(min(max(self.data.qpos[info["qpos"]], lo), hi))

    def light_button(self, name: str, lit: bool = True) -> None:
        self._require_built()
        info = self._info(name)
        if info["kind"] != "button":
            raise ValueError(f"object {name!r} is a {info['kind']}, not a button")
        self.model.geom_rgba[info["base_geom"]] = BUTTON_LIT_RGBA if lit else BUTTON_BASE_RGBA

    def grasped(self, name: str) -> bool:
        self._require_built()
        info = self._info(name)
        d = self.data
        if d.ncon == 0:
            return False
        g1, g2 = d.contact.geom1, d.contact.geom2
        obj = info["geom_mask"]
        on1, on2 = obj[g1], obj[g2]
        left = np.any((on1 & self._left_geom[g2]) | (on2 & self._left_geom[g1]))
        right = np.any((on1 & self._right_geom[g2]) | (on2 & self._right_geom[g1]))
        return bool(left and right)

    def physics_parameters(self) -> dict[str, float]:
        self._require_built()
        m = self.model
        params: dict[str, float] = {}
        for name, info in self._objects.items():
            if info["kind"] == "box":
                params[f"{name}/mass"] = float(m.body_mass[info["moving_body"]])
                params[f"{name}/friction"] = float(m.geom_friction[info["geoms"][0], 0])
        params["damping"] = float(m.dof_damping[0])
        return params

    # ------------------------------------------------------------------------------------------
    # rendering
    # ------------------------------------------------------------------------------------------
    def render(self, camera: str = "front") -> np.ndarray:
        self._require_built()
        if camera == "front":
            cam = self._front_cam
        elif camera == "wrist":
            if not self.wrist_camera:
                raise ValueError("this backend was created with wrist_camera=False")
            cam = self._wrist_cam
        else:
            raise ValueError(f"unknown camera {camera!r}; valid cameras: 'front', 'wrist'")
        if self._renderer is None:
            h, w = self.image_size
            self._renderer = mujoco.Renderer(self.model, height=h, width=w)
            _OPEN_BACKENDS.add(self)
        self._renderer.update_scene(self.data, camera=cam)
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
