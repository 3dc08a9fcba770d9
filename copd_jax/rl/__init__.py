"""RL: objectives, schedules, stages, the host rollout half and the device update half of a
step, the stage loop, the methods, evaluation and diagnostics."""
