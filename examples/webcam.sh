#!/bin/sh
# A webcam with live results drawn on the video (async: the camera never waits).
# MODEL defaults to the bundled demo model.
MODEL=${MODEL:-models/demo/paligemma2-demo-f16.gguf}
GST_PLUGIN_PATH=${GST_PLUGIN_PATH:-$PWD/target/release} exec gst-launch-1.0 \
  v4l2src ! videoconvert ! \
  paligemma model="$MODEL" prompts="caption en|detect person ; car" mode=async ! \
  videoconvert ! paligemmaoverlay ! videoconvert ! autovideosink
