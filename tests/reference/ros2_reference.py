"""Reference CDR bytes and RIHS01 type hashes for the ROS 2 messages of
crates/paligemma-stream/src/ros2, made with rosbags (an independent, pure-Python
implementation of ROS 2's CDR and of REP 2011's type hashing), written to
tests/fixtures/ros2/reference.json for crates/paligemma-stream/tests/ros2.rs.

    python3 -m venv /tmp/rosenv && /tmp/rosenv/bin/pip install rosbags==0.11.9
    /tmp/rosenv/bin/python tests/reference/ros2_reference.py
"""
import json
import pathlib

from rosbags.typesys import Stores, get_typestore, get_types_from_msg

# vision_msgs 4.1 (Humble and later), which rosbags' stores do not carry.
VISION_MSGS = {
    'vision_msgs/msg/Point2D': 'float64 x\nfloat64 y\n',
    'vision_msgs/msg/Pose2D': 'vision_msgs/Point2D position\nfloat64 theta\n',
    'vision_msgs/msg/BoundingBox2D': 'vision_msgs/Pose2D center\nfloat64 size_x\nfloat64 size_y\n',
    'vision_msgs/msg/ObjectHypothesis': 'string class_id\nfloat64 score\n',
    'vision_msgs/msg/ObjectHypothesisWithPose': 'vision_msgs/ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n',
    'vision_msgs/msg/Detection2D': 'std_msgs/Header header\nvision_msgs/ObjectHypothesisWithPose[] results\nvision_msgs/BoundingBox2D bbox\nstring id\n',
    'vision_msgs/msg/Detection2DArray': 'std_msgs/Header header\nvision_msgs/Detection2D[] detections\n',
}

store = get_typestore(Stores.ROS2_JAZZY)
for name, text in VISION_MSGS.items():
    store.register(get_types_from_msg(text, name))
T = store.types

def header(sec, nanosec, frame):
    return T['std_msgs/msg/Header'](stamp=T['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec), frame_id=frame)

def hypothesis(label, score):
    pose = T['geometry_msgs/msg/PoseWithCovariance'](
        pose=T['geometry_msgs/msg/Pose'](
            position=T['geometry_msgs/msg/Point'](x=0.0, y=0.0, z=0.0),
            orientation=T['geometry_msgs/msg/Quaternion'](x=0.0, y=0.0, z=0.0, w=1.0)),
        covariance=__import__('numpy').zeros(36))
    return T['vision_msgs/msg/ObjectHypothesisWithPose'](hypothesis=T['vision_msgs/msg/ObjectHypothesis'](class_id=label, score=score), pose=pose)

def detection(h, label, score, cx, cy, w, hgt, ident):
    bbox = T['vision_msgs/msg/BoundingBox2D'](center=T['vision_msgs/msg/Pose2D'](position=T['vision_msgs/msg/Point2D'](x=cx, y=cy), theta=0.0), size_x=w, size_y=hgt)
    return T['vision_msgs/msg/Detection2D'](header=h, results=[hypothesis(label, score)], bbox=bbox, id=ident)

import numpy as np
h = header(1795000000, 123456789, 'front_camera')
samples = {
    'std_msgs/msg/String': T['std_msgs/msg/String'](data='a red ball on grass'),
    'vision_msgs/msg/Detection2DArray': T['vision_msgs/msg/Detection2DArray'](header=h, detections=[
        detection(h, 'ball', 0.83, 320.5, 240.25, 64.0, 48.0, 'objects'),
        detection(h, 'cup', 0.125, 10.0, 20.0, 4.0, 6.0, 'objects'),
    ]),
    'vision_msgs/msg/Detection2DArray#empty': T['vision_msgs/msg/Detection2DArray'](header=header(0, 0, ''), detections=[]),
    'sensor_msgs/msg/Image': T['sensor_msgs/msg/Image'](header=h, height=2, width=3, encoding='rgb8', is_bigendian=0, step=9, data=np.arange(18, dtype=np.uint8)),
    'sensor_msgs/msg/CompressedImage': T['sensor_msgs/msg/CompressedImage'](header=h, format='jpeg', data=np.array([0xff, 0xd8, 0xff, 0xe0, 1], dtype=np.uint8)),
    'diagnostic_msgs/msg/DiagnosticArray': T['diagnostic_msgs/msg/DiagnosticArray'](header=header(1795000000, 5, ''), status=[
        T['diagnostic_msgs/msg/DiagnosticStatus'](level=1, name='paligemma: camera front', message='stalled: no frame for 2.0 s',
            hardware_id='front', values=[T['diagnostic_msgs/msg/KeyValue'](key='state', value='stalled'),
                                         T['diagnostic_msgs/msg/KeyValue'](key='restarts', value='3')]),
        T['diagnostic_msgs/msg/DiagnosticStatus'](level=0, name='paligemma: node', message='', hardware_id='', values=[]),
    ]),
}
out = {'hashes': {}, 'cdr': {}}
for name in ['builtin_interfaces/msg/Time', 'std_msgs/msg/Header', 'std_msgs/msg/String', 'geometry_msgs/msg/PoseWithCovariance',
             'sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage', *VISION_MSGS,
             'diagnostic_msgs/msg/KeyValue', 'diagnostic_msgs/msg/DiagnosticStatus', 'diagnostic_msgs/msg/DiagnosticArray']:
    out['hashes'][name] = store.hash_rihs01(name)
for key, msg in samples.items():
    out['cdr'][key] = bytes(store.serialize_cdr(msg, key.split('#')[0])).hex()
path = pathlib.Path(__file__).resolve().parents[1] / 'fixtures' / 'ros2' / 'reference.json'
path.write_text(json.dumps(out, indent=1) + '\n')
print(f'wrote {path}')
