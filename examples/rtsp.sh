#!/bin/sh
# An RTSP camera (H.264), results on the bus (-m) and as text on stdout via text_src.
# Usage: examples/rtsp.sh rtsp://camera/stream
MODEL=${MODEL:-models/demo/paligemma2-demo-f16.gguf}
GST_PLUGIN_PATH=${GST_PLUGIN_PATH:-$PWD/target/release} exec gst-launch-1.0 -m \
  rtspsrc location="$1" latency=200 ! rtph264depay ! avdec_h264 ! videoconvert ! \
  paligemma name=pg model="$MODEL" prompts="detect person ; car" mode=async ! fakesink \
  pg.text_src ! text/x-raw,format=utf8 ! fdsink fd=1
