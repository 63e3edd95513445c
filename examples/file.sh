#!/bin/sh
# A video file, every analysed frame carrying its own results (sync), written to a new file
# with the boxes drawn. Usage: examples/file.sh input.mp4 output.mkv
MODEL=${MODEL:-models/demo/paligemma2-demo-f16.gguf}
GST_PLUGIN_PATH=${GST_PLUGIN_PATH:-$PWD/target/release} exec gst-launch-1.0 -m \
  filesrc location="$1" ! decodebin ! videoconvert ! \
  paligemma model="$MODEL" prompts-file=configs/prompts.toml mode=sync interval=1000 ! \
  videoconvert ! paligemmaoverlay ! videoconvert ! x264enc ! matroskamux ! filesink location="$2"
