"""ROS messages as rosbridge JSON: builders and strict parsers.

rosbridge carries a ROS message as a JSON object with the message's field names; `uint8[]`
fields (image data) travel as base64 strings; a header stamp is `{sec, nanosec}` on ROS 2 and
`{secs, nsecs}` on ROS 1 (both are accepted). Every parser checks type, shape, size and
finiteness and raises `MessageError` naming the field at fault: a message that does not parse
is dropped and logged by its caller, never turned into a command.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Any

import numpy as np

from envs.scene import euler_to_matrix, matrix_to_euler

MAX_IMAGE_SIDE = 4096
MAX_IMAGE_BYTES = 8_000_000


class MessageError(ValueError):
    """A rosbridge message (or a field of it) that is malformed, wrongly typed or too large."""


# -- primitives ----------------------------------------------------------------------------------

def _field(msg: Any, name: str, where: str) -> Any:
    if not isinstance(msg, dict):
        raise MessageError(f"{where}: expected an object, got {type(msg).__name__}")
    if name not in msg:
        raise MessageError(f"{where}: missing field {name!r}")
    return msg[name]


def _number(value: Any, where: str) -> float:
    # bool is an int subclass in Python; a ROS float64 field never holds true/false.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MessageError(f"{where}: expected a number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise MessageError(f"{where}: not finite ({value!r})")
    return out


def _vector(msg: Any, where: str, keys=("x", "y", "z")) -> np.ndarray:
    return np.array([_number(_field(msg, k, where), f"{where}.{k}") for k in keys], dtype=np.float64)


def _string(value: Any, where: str, max_length: int = 1024) -> str:
    if not isinstance(value, str):
        raise MessageError(f"{where}: expected a string, got {type(value).__name__}")
    if len(value) > max_length:
        raise MessageError(f"{where}: string of {len(value)} characters exceeds {max_length}")
    return value


def header(stamp: float, frame_id: str, ros_version: int = 2) -> dict:
    sec = int(math.floor(stamp))
    nanosec = int(round((stamp - sec) * 1e9)) % 1_000_000_000
    if ros_version == 1:
        return {"seq": 0, "stamp": {"secs": sec, "nsecs": nanosec}, "frame_id": frame_id}
    return {"stamp": {"sec": sec, "nanosec": nanosec}, "frame_id": frame_id}


def parse_stamp(msg: Any, where: str = "header") -> float:
    stamp = _field(_field(msg, "header", where) if where == "header" else msg, "stamp", where)
    if not isinstance(stamp, dict):
        raise MessageError(f"{where}.stamp: expected an object, got {type(stamp).__name__}")
    if "sec" in stamp:
        sec, nsec = stamp["sec"], stamp.get("nanosec", 0)
    elif "secs" in stamp:
        sec, nsec = stamp["secs"], stamp.get("nsecs", 0)
    else:
        raise MessageError(f"{where}.stamp: needs sec/nanosec (ROS 2) or secs/nsecs (ROS 1)")
    return _number(sec, f"{where}.stamp.sec") + _number(nsec, f"{where}.stamp.nanosec") * 1e-9


# -- rotations -----------------------------------------------------------------------------------

def rpy_to_rotvec(rpy) -> np.ndarray:
    """Extrinsic roll-pitch-yaw (the action convention) -> rotation vector (axis * angle)."""
    m = euler_to_matrix(*np.asarray(rpy, dtype=np.float64))
    cos = np.clip((np.trace(m) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-9:
        return np.zeros(3)
    axis = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]]) / (2.0 * math.sin(angle))
    return axis * angle


def rotvec_to_matrix(rotvec) -> np.ndarray:
    rotvec = np.asarray(rotvec, dtype=np.float64)
    angle = float(np.linalg.norm(rotvec))
    if angle < 1e-12:
        return np.eye(3)
    k = rotvec / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def rotvec_to_rpy(rotvec) -> np.ndarray:
    return np.asarray(matrix_to_euler(rotvec_to_matrix(rotvec)), dtype=np.float64)


# -- geometry_msgs -------------------------------------------------------------------------------

def twist_stamped(linear, angular, frame_id: str, stamp: float, ros_version: int = 2) -> dict:
    linear = [float(v) for v in linear]
    angular = [float(v) for v in angular]
    return {"header": header(stamp, frame_id, ros_version),
            "twist": {"linear": dict(zip("xyz", linear)), "angular": dict(zip("xyz", angular))}}


def parse_twist_stamped(msg: Any, where: str = "TwistStamped") -> tuple[np.ndarray, np.ndarray, str]:
    twist = _field(msg, "twist", where)
    linear = _vector(_field(twist, "linear", f"{where}.twist"), f"{where}.twist.linear")
    angular = _vector(_field(twist, "angular", f"{where}.twist"), f"{where}.twist.angular")
    frame = ""
    if isinstance(msg.get("header"), dict):
        frame = _string(msg["header"].get("frame_id", ""), f"{where}.header.frame_id", 256)
    return linear, angular, frame


def pose_stamped(position, quat_xyzw, frame_id: str, stamp: float, ros_version: int = 2) -> dict:
    return {"header": header(stamp, frame_id, ros_version),
            "pose": {"position": dict(zip("xyz", map(float, position))),
                     "orientation": dict(zip("xyzw", map(float, quat_xyzw)))}}


def parse_pose_stamped(msg: Any, where: str = "PoseStamped", max_distance: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Position (3,) and unit quaternion xyzw (4,); positions beyond `max_distance` metres are implausible."""
    pose = _field(msg, "pose", where)
    position = _vector(_field(pose, "position", f"{where}.pose"), f"{where}.pose.position")
    if np.max(np.abs(position)) > max_distance:
        raise MessageError(f"{where}.pose.position: {position.tolist()} is more than {max_distance} m from the base")
    quat = _vector(_field(pose, "orientation", f"{where}.pose"), f"{where}.pose.orientation", keys="xyzw")
    if np.max(np.abs(quat)) > 1.1:
        raise MessageError(f"{where}.pose.orientation: not a unit quaternion ({quat.tolist()})")
    norm = float(np.linalg.norm(quat))
    if not 0.9 < norm < 1.1:
        raise MessageError(f"{where}.pose.orientation: not a unit quaternion (norm {norm:.4g})")
    quat = quat / norm
    return position, quat if quat[3] >= 0 else -quat


# -- sensor_msgs ---------------------------------------------------------------------------------

def joint_state(names, positions, stamp: float, ros_version: int = 2) -> dict:
    return {"header": header(stamp, "", ros_version), "name": list(names),
            "position": [float(p) for p in positions], "velocity": [], "effort": []}


def parse_joint_state(msg: Any, where: str = "JointState", max_joints: int = 64) -> dict[str, float]:
    names = _field(msg, "name", where)
    positions = _field(msg, "position", where)
    if not isinstance(names, list) or not isinstance(positions, list):
        raise MessageError(f"{where}: name and position must be lists")
    if len(names) != len(positions):
        raise MessageError(f"{where}: {len(names)} names for {len(positions)} positions")
    if len(names) > max_joints:
        raise MessageError(f"{where}: {len(names)} joints exceeds {max_joints}")
    return {_string(n, f"{where}.name[{i}]", 128): _number(p, f"{where}.position[{i}]")
            for i, (n, p) in enumerate(zip(names, positions))}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decode_b64(value: Any, where: str, max_bytes: int) -> bytes:
    if isinstance(value, list):  # some bridges send uint8[] as a list of ints
        if len(value) > max_bytes:
            raise MessageError(f"{where}: {len(value)} bytes exceeds {max_bytes}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 256 for v in value):
            raise MessageError(f"{where}: a list of data must hold integers 0..255")
        return bytes(value)
    value = _string(value, where, max_length=(max_bytes * 4) // 3 + 4)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise MessageError(f"{where}: not valid base64 ({err})") from None


def compressed_image(image: np.ndarray, stamp: float, frame_id: str = "camera", image_format: str = "jpeg",
                     quality: int = 90, ros_version: int = 2) -> dict:
    from PIL import Image

    buf = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    elif image_format == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    return {"header": header(stamp, frame_id, ros_version), "format": image_format, "data": _b64(buf.getvalue())}


def raw_image(image: np.ndarray, stamp: float, frame_id: str = "camera", ros_version: int = 2) -> dict:
    h, w, _ = image.shape
    return {"header": header(stamp, frame_id, ros_version), "height": h, "width": w, "encoding": "rgb8",
            "is_bigendian": 0, "step": 3 * w, "data": _b64(np.ascontiguousarray(image, dtype=np.uint8).tobytes())}


def parse_compressed_image(msg: Any, where: str = "CompressedImage", max_bytes: int = MAX_IMAGE_BYTES,
                           max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    from PIL import Image

    fmt = _string(_field(msg, "format", where), f"{where}.format", 64).lower()
    if not any(k in fmt for k in ("jpeg", "jpg", "png")):
        raise MessageError(f"{where}.format: {fmt!r} is not jpeg or png")
    data = _decode_b64(_field(msg, "data", where), f"{where}.data", max_bytes)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "PNG"):
                raise MessageError(f"{where}.data: decodes as {img.format}, not jpeg or png")
            w, h = img.size
            if not (0 < w <= max_side and 0 < h <= max_side):
                raise MessageError(f"{where}.data: image {w}x{h} exceeds {max_side} px per side")
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except MessageError:
        raise
    except Exception as err:  # PIL raises many types for corrupt data
        raise MessageError(f"{where}.data: cannot decode the image ({type(err).__name__}: {err})") from None
    if "bgr" in fmt:
        array = array[..., ::-1]
    return np.ascontiguousarray(array)


def parse_raw_image(msg: Any, where: str = "Image", max_bytes: int = MAX_IMAGE_BYTES,
                    max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    height = _number(_field(msg, "height", where), f"{where}.height")
    width = _number(_field(msg, "width", where), f"{where}.width")
    if height != int(height) or width != int(width) or not (0 < height <= max_side and 0 < width <= max_side):
        raise MessageError(f"{where}: size {height}x{width} must be whole numbers in 1..{max_side}")
    h, w = int(height), int(width)
    encoding = _string(_field(msg, "encoding", where), f"{where}.encoding", 32)
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}.get(encoding)
    if channels is None:
        raise MessageError(f"{where}.encoding: {encoding!r} is not one of rgb8, bgr8, rgba8, bgra8, mono8")
    data = _decode_b64(_field(msg, "data", where), f"{where}.data", max_bytes)
    step = int(_number(msg.get("step", w * channels), f"{where}.step"))
    if step < w * channels or len(data) != step * h:
        raise MessageError(f"{where}.data: {len(data)} bytes do not match {h} rows of step {step} "
                           f"({w} px x {channels} channels)")
    array = np.frombuffer(data, dtype=np.uint8).reshape(h, step)[:, : w * channels].reshape(h, w, channels)
    if encoding == "mono8":
        array = np.repeat(array, 3, axis=2)
    elif encoding.startswith("bgr"):
        array = array[..., 2::-1]
    else:
        array = array[..., :3]
    return np.ascontiguousarray(array)


# -- std_msgs ------------------------------------------------------------------------------------

def parse_bool(msg: Any, where: str = "Bool") -> bool:
    value = _field(msg, "data", where)
    if not isinstance(value, bool):
        raise MessageError(f"{where}.data: expected true or false, got {type(value).__name__}")
    return value


def parse_float64(msg: Any, where: str = "Float64") -> float:
    return _number(_field(msg, "data", where), f"{where}.data")


def parse_string(msg: Any, where: str = "String", max_length: int = 65536) -> str:
    return _string(_field(msg, "data", where), f"{where}.data", max_length)


def parse_gripper_command(msg: Any, message_type: str, max_width: float, where: str = "gripper") -> float:
    """Gripper opening in [0, 1] (1 = open) from `std_msgs/Float64` (already in [0, 1]) or
    `control_msgs/GripperCommand` (position = finger distance in metres)."""
    if message_type.endswith("Float64"):
        value = parse_float64(msg, where)
    elif message_type.endswith("GripperCommand"):
        value = _number(_field(msg, "position", where), f"{where}.position") / max_width
    else:
        raise MessageError(f"{where}: unsupported gripper message type {message_type!r}")
    if not 0.0 <= value <= 1.0:
        raise MessageError(f"{where}: opening {value:.4g} is outside [0, 1]")
    return value


def gripper_command(opening: float, message_type: str, max_width: float) -> dict:
    if message_type.endswith("Float64"):
        return {"data": float(opening)}
    if message_type.endswith("GripperCommand"):
        return {"position": float(opening) * max_width, "max_effort": 40.0}
    raise ValueError(f"unsupported gripper message type {message_type!r}; valid: std_msgs/Float64, "
                     "control_msgs/GripperCommand")
