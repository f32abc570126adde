"""Meta-World v3 tasks as gymnasium environments with dict observations.

Observations are a dict: ``state`` (39 floats: hand, gripper, objects, previous frame,
goal), ``proprio`` (hand xyz + gripper opening, 4 floats) and, when cameras are asked
for, ``image_<camera>`` per camera (H x W x 3 uint8, upright; several cameras are drawn
in turn by one MuJoCo renderer with the fast settings: no shadows, no multisampling).
``info["success"]`` is the task's
success flag. Every episode's goal and object placement is a deterministic function of
the seed passed to ``reset``.
"""

from __future__ import annotations

import os
import warnings

import gymnasium as gym
import numpy as np

from mixpolicy.datasets.store_meta import UNKNOWN_TASK
from mixpolicy.envs.registry import Environment
from mixpolicy.errors import UserError
from mixpolicy.keys import camera_key, camera_name, is_image_key

# Language strings for the tasks (Meta-World ships none). Used for task conditioning
# and shown in tables; keep them short and imperative.
TASK_DESCRIPTIONS: dict[str, str] = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "dunk the ball into the basket",
    "bin-picking-v3": "move the puck from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button behind the wall from the top",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "rotate the dial",
    "disassemble-v3": "pick the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by rotating the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by rotating the lock",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "open the drawer",
    "faucet-close-v3": "turn the faucet right",
    "faucet-open-v3": "turn the faucet left",
    "hammer-v3": "hammer the nail into the wall",
    "hand-insert-v3": "insert the gripper into the hole",
    "handle-press-side-v3": "press the handle down sideways",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up sideways",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "peg-insert-side-v3": "insert the peg sideways into the hole",
    "peg-unplug-side-v3": "unplug the peg sideways",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "plate-slide-back-side-v3": "slide the plate back sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate back into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-v3": "slide the plate into the cabinet",
    "push-back-v3": "push the puck back to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal behind the wall",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position behind the wall",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "soccer-v3": "kick the ball into the goal",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "stick-push-v3": "grasp the stick and push the box with it",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-close-v3": "push the window closed",
    "window-open-v3": "push the window open",
}

# The 10 tasks of Meta-World's MT10 benchmark.
MT10_TASKS: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)

STATE_DIM = 39
PROPRIO_DIM = 4
ACTION_DIM = 4
GRIPPER_ACTION_DIM = 3  # the gripper effort, which is effectively binary
CONTROL_HZ = 80.0  # frame_skip 5 x timestep 2.5 ms
# Framed workspace cameras (MuJoCo free cameras, not in the model file): looking at the
# workspace centre from this distance (m), azimuth and elevation (degrees), so the objects
# and goals of the table tasks fill the frame (several pixels across at 64x64, where the
# model's own cameras show them as 1-3 pixels at 84x84). ``front`` looks down at the table
# from the side facing the robot (x and y, the table plane); ``side`` looks along the
# table from the +x side (y and height); together they place a floating goal in 3D.
FRAMED_CAMERAS: dict[str, dict[str, float]] = {
    "front": {"distance": 0.6, "azimuth": -90.0, "elevation": -60.0},
    "side": {"distance": 0.65, "azimuth": 180.0, "elevation": -25.0},
}
FRAMED_LOOKAT = (0.0, 0.72, 0.12)
MODEL_CAMERAS = ("corner", "corner2", "corner3", "topview", "behindGripper", "gripperPOV")
CAMERAS = MODEL_CAMERAS + tuple(FRAMED_CAMERAS)
# These cameras are defined with their up vector pointing down (corner: xyaxes y = -z),
# so their frames come out rotated by 180 degrees; we rotate them back.
_UPSIDE_DOWN_CAMERAS = frozenset({"corner", "corner2", "corner3"})


def available_tasks() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted(ALL_V3_ENVIRONMENTS)


def check_task_names(tasks: list[str] | tuple[str, ...]) -> None:
    """Raise a UserError naming every unknown task."""
    known = set(available_tasks())
    unknown = [t for t in tasks if t not in known]
    if unknown:
        import difflib

        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, known, n=1)
            hints.append(f"{t!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UserError(
            f"unknown Meta-World task {', '.join(hints)}; run `mixpolicy tasks` for the list"
        )


def task_description(task: str) -> str:
    return TASK_DESCRIPTIONS.get(task, task.removesuffix("-v3").replace("-", " "))


class MetaWorldEnv(gym.Env):
    """One Meta-World v3 task with the goal observable and seeded placement."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        task: str,
        cameras: tuple[str, ...] | list[str] = (),
        image_size: int = 84,
        max_episode_steps: int = 500,
    ):
        check_task_names([task])
        for cam in cameras:
            if cam not in CAMERAS:
                raise UserError(f"unknown camera {cam!r}; choose from {', '.join(CAMERAS)}")
        if len(set(cameras)) != len(cameras):
            raise UserError(f"cameras {list(cameras)} name a camera twice")
        if max_episode_steps < 1 or max_episode_steps > 500:
            raise UserError("max_episode_steps must be in [1, 500] (Meta-World's own cap)")
        if cameras:
            os.environ.setdefault("MUJOCO_GL", "egl")
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        self.task = task
        self.description = task_description(task)
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self.max_episode_steps = int(max_episode_steps)
        env = ALL_V3_ENVIRONMENTS[task]()
        # Goal observable, placement drawn from the env's own seeded RNG at each reset.
        env._partially_observable = False
        del env.sawyer_observation_space  # recomputed for the observable goal
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._set_task_called = True
        if self.cameras:
            vis = env.model.vis
            # Defaults (4096 shadow map, 4x MSAA) make rendering ~9x slower.
            vis.quality.shadowsize = 0
            vis.quality.offsamples = 0
            vis.global_.offwidth = self.image_size
            vis.global_.offheight = self.image_size
        # One MuJoCo renderer draws every camera of a step in turn (one GL context per env).
        self._renderer = self._make_renderer(env) if self.cameras else None
        self._env = env
        self._steps = 0
        spaces = {
            "state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32),
            "proprio": gym.spaces.Box(-np.inf, np.inf, (PROPRIO_DIM,), np.float32),
        }
        for cam in self.cameras:
            spaces[camera_key(cam)] = gym.spaces.Box(
                0, 255, (self.image_size, self.image_size, 3), np.uint8
            )
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)

    def _make_renderer(self, env):
        import mujoco

        self._camera_ids = []
        for c in self.cameras:
            if c in FRAMED_CAMERAS:
                cam = mujoco.MjvCamera()
                cam.type = mujoco.mjtCamera.mjCAMERA_FREE
                cam.lookat[:] = FRAMED_LOOKAT
                for name, value in FRAMED_CAMERAS[c].items():
                    setattr(cam, name, value)
                self._camera_ids.append(cam)
            else:
                self._camera_ids.append(mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, c))
        return mujoco.Renderer(env.model, self.image_size, self.image_size)

    def _frame(self, i: int) -> np.ndarray:
        self._renderer.update_scene(self._env.data, camera=self._camera_ids[i])
        frame = self._renderer.render()
        if self.cameras[i] in _UPSIDE_DOWN_CAMERAS:
            frame = frame[::-1, ::-1]
        return np.ascontiguousarray(frame)

    def _observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        state = state.astype(np.float32)
        obs = {"state": state, "proprio": state[:PROPRIO_DIM].copy()}
        for i, cam in enumerate(self.cameras):
            obs[camera_key(cam)] = self._frame(i)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(int(seed))
        self._steps = 0
        state, info = self._env.reset()
        return self._observation(state), {"success": False, "task": self.task}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape ({ACTION_DIM},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError("action contains NaN or inf")
        state, reward, _, truncated, info = self._env.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        success = bool(info.get("success", 0.0) > 0.5)
        truncated = bool(truncated) or self._steps >= self.max_episode_steps
        out_info = {"success": success, "task": self.task}
        return self._observation(state), float(reward), success, truncated, out_info

    def render(self):
        """The first camera's frame (videos and viewers show it), None without cameras."""
        return self._frame(0) if self.cameras else None

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()


def scripted_expert(task: str):
    """Meta-World's scripted expert for ``task``: ``expert(state) -> action``."""
    check_task_names([task])
    from metaworld.policies import ENV_POLICY_MAP

    policy = ENV_POLICY_MAP[task]()

    def act(state: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(policy.get_action(np.asarray(state, np.float64)), np.float32)

    return act


class MetaWorldEnvironment(Environment):
    """Meta-World v3 tasks for ``mixpolicy eval env=metaworld`` (the default)."""

    name = "metaworld"
    max_episode_steps = 500
    max_episode_steps_cap = 500

    def check_tasks(self, tasks: list[str]) -> None:
        check_task_names(tasks)

    def tasks(self, policy, requested: list[str]) -> list[str]:
        tasks = list(requested) or list(policy.shape_meta.tasks)
        if not tasks or tasks == [UNKNOWN_TASK]:
            raise UserError("the checkpoint records no Meta-World tasks; pass tasks=[...]")
        check_task_names(tasks)
        return tasks

    def make(self, task: str, obs_shapes: dict[str, list[int]], frame_size: int, max_episode_steps: int) -> MetaWorldEnv:
        cameras = [camera_name(k) for k in obs_shapes if is_image_key(k)]
        if cameras:  # the policy's cameras at their size; render() shows the first
            sizes = {tuple(obs_shapes[camera_key(c)][:2]) for c in cameras}
            if len(sizes) > 1 or any(h != w for h, w in sizes):
                raise UserError(f"Meta-World renders every camera as one square size; the checkpoint's cameras are {sorted(sizes)}")
            return MetaWorldEnv(task, cameras=cameras, image_size=obs_shapes[camera_key(cameras[0])][0], max_episode_steps=max_episode_steps)
        return MetaWorldEnv(task, cameras=["corner"] if frame_size else [], image_size=frame_size or 84, max_episode_steps=max_episode_steps)


METAWORLD = MetaWorldEnvironment()
