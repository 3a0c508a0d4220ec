"""FFmpeg on the agent: probing inputs, and running commands built by ffmpeg-python with a time limit."""
