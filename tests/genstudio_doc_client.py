"""A client written from GenStudio's documentation, as its users write one: the Python functions of
GenStudio's tutorial ("通过 API 使用托管 ComfyUI 工作流", its Jupyter Notebook), copied unchanged but for:

- the base URL: `https://{SERVER_ADDRESS}` became `http://{SERVER_ADDRESS}` (the test app is plain HTTP);
- the settings cell keeps its environment reads (the tests set them) and drops the cell that
  overwrites them with literals; `server_address`/`api_key`, which the tutorial's `upload_image`
  names in lower case, are bound to the same values (the tutorial leaves them undefined).

Nothing else is ours: the bugs of the tutorial stay (e.g. `prompt[load_image]['image']` beside
`inputs`), because the service must work with the clients people copied from it.
"""
# ruff: noqa
# mypy: ignore-errors

import os
import requests
import time
import json
import random
from PIL import Image
import io
from urllib.parse import urlparse

# 设置全局变量
# 设置 API 密钥和服务器地址
API_KEY = os.getenv("COMFYUI_API_KEY")
SERVER_ADDRESS = os.getenv("COMFYUI_SERVER_ADDRESS")
# 设置默认工作流 ID
DEFAULT_WORKFLOW_ID = os.getenv("DEFAULT_WORKFLOW_ID")
# 设置默认输出路径
DEFAULT_OUTPUT_PATH = os.getenv("DEFAULT_OUTPUT_PATH")
# 设置图生图默认上传路径
DEFAULT_INPUT_PATH = os.getenv("DEFAULT_INPUT_PATH")
# 设置 ComfyUI API JSON 文生图 Workflow 文件路径
COMFY_T2I_WORKFLOW_API_JSON_PATH = os.getenv("COMFY_T2I_WORKFLOW_API_JSON_PATH")
# 设置 ComfyUI API JSON 图生图 Workflow 文件路径
COMFY_I2I_WORKFLOW_API_JSON_PATH = os.getenv("COMFY_I2I_WORKFLOW_API_JSON_PATH")
# 设置 ComfyUI 使用的 Checkpoint 名称
CHECKPOINT_NAME = os.getenv("CHECKPOINT_NAME")

server_address, api_key = SERVER_ADDRESS, API_KEY  # ours: the names upload_image uses

# 验证所有环境变量是否设置
environment_variables = [
    API_KEY,
    SERVER_ADDRESS,
    DEFAULT_WORKFLOW_ID,
    DEFAULT_OUTPUT_PATH,
    COMFY_T2I_WORKFLOW_API_JSON_PATH,
    CHECKPOINT_NAME,
]
if not all(environment_variables):
    missing_variables = [
        var_name
        for var_name, var_value in zip(
            [
                "API_KEY",
                "SERVER_ADDRESS",
                "DEFAULT_WORKFLOW_ID",
                "DEFAULT_OUTPUT_PATH",
                "COMFY_t2i_WORKFLOW_API_JSON_PATH",
                "CHECKPOINT_NAME",
            ],
            environment_variables,
        )
        if not var_value
    ]
    raise ValueError(f"以下环境变量未设置:{', '.join(missing_variables)}")

print("所有全局变量已设置。")


def queue_prompt(workflow_id=DEFAULT_WORKFLOW_ID, prompt=None):
    """
    将提示排队处理。
    """
    if not workflow_id:
        raise ValueError("workflow_id 是必需的,不能为空")

    url = f"http://{SERVER_ADDRESS}/api/maas/comfy_task_api/prompt"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    payload = {"workflow_id": workflow_id, "prompt": prompt}

    try:
        response = requests.post(url, headers=headers, json=payload)
        response.raise_for_status()
        return response.json()
    except requests.exceptions.RequestException as e:
        print(f"queue_prompt 出错,未能将生图请求加入队列: {e}")
        return None


def get_task_info(prompt_ids, url_expire_period=3600):
    url = f"http://{SERVER_ADDRESS}/api/maas/comfy_task_api/get_task_info"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    payload = {"comfy_task_ids": prompt_ids, "url_expire_period": url_expire_period}
    response = requests.post(url, headers=headers, json=payload)
    response.raise_for_status()
    return response.json()


def upload_image(file_path):
    url = f"http://{server_address}/api/maas/comfy_task_api/upload/image"
    headers = {"Accept": "application/json", "Authorization": f"Bearer {api_key}"}
    with open(file_path, "rb") as file:
        files = {"source_file": file}
        response = requests.post(url, headers=headers, files=files)
    response.raise_for_status()
    return response.json()


def get_prompt_json_body(api_params):
    """
    提取 GenStudio 托管工作流参数,制作 API 的 Promt 输入。
    """
    prompt_json_body = {}

    for key, value in api_params.items():
        # Initialize the new structure with top-level keys
        prompt_json_body[key] = {"inputs": {}}

        # Focus on 'inputs' only
        if "inputs" in value:
            for input_key, input_value in value["inputs"].items():
                # Swap the value to 'current' in the sub-level objects
                prompt_json_body[key]["inputs"][input_key] = input_value.get("current")

    return prompt_json_body


def get_id_to_class_type_map(COMFY_WORKFLOW_API_JSON_PATH):
    try:
        with open(COMFY_WORKFLOW_API_JSON_PATH, "r", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        print(f"未找到文件 {COMFY_WORKFLOW_API_JSON_PATH}")
        return None
    except json.JSONDecodeError:
        print(f"文件 {COMFY_WORKFLOW_API_JSON_PATH} 包含无效的 JSON。")
        return None

    id_to_class_type = {}

    for node_id, node_data in data.items():
        # Default mapping
        id_to_class_type[node_id] = node_data["class_type"]

    # 特殊处理 KSampler 节点,从中获取正负提示词的节点 ID
    for node_id, node_data in data.items():
        if node_data["class_type"] == "KSampler":
            positive_input_id = node_data["inputs"].get("positive", [None])[0]
            negative_input_id = node_data["inputs"].get("negative", [None])[0]

            if positive_input_id is not None:
                id_to_class_type[positive_input_id] = "positive_input_id"
            if negative_input_id is not None:
                id_to_class_type[negative_input_id] = "negative_input_id"

    # Return the dictionary
    return id_to_class_type


def get_images(files_dict):
    """
    从给定的文件字典中获取图像。
    """
    output_images = []
    for key, urls in files_dict.items():
        for url in urls:
            try:
                response = requests.get(url)
                response.raise_for_status()
                file_name = os.path.basename(urlparse(url).path.split("?")[0])  # Remove query parameters from filename
                output_images.append(
                    {"file_name": file_name, "image_data": response.content, "type": "output", "key": key}
                )
            except Exception as e:
                print(f"获取图像失败 {url}: {e}")
    return output_images


def save_images(images, output_path, save_previews):
    """
    将图像保存到指定路径。
    """
    for item in images:
        directory = os.path.join(output_path, item["key"])
        if item["type"] == "temp" and save_previews:
            directory = os.path.join(directory, "temp")
        os.makedirs(directory, exist_ok=True)
        try:
            if "image_data" not in item or item["image_data"] is None:
                print(f"跳过保存图像 {item.get('file_name', 'unknown')}: 没有图像数据")
                continue
            image = Image.open(io.BytesIO(item["image_data"]))
            image.save(os.path.join(directory, item["file_name"]))
            print(f"成功保存图像: {os.path.join(directory, item['file_name'])}")
        except Exception as e:
            print(f"保存图像 {item.get('file_name', 'unknown')} 失败: {e}")


def generate_image_by_prompt(
    workflow_id=DEFAULT_WORKFLOW_ID, prompt=None, output_path=DEFAULT_OUTPUT_PATH, save_previews=False
):
    """
    根据提示生成图像并保存到指定路径。
    """
    if not workflow_id:
        raise ValueError("workflow_id 是必需的,不能为空")
    if not output_path:
        raise ValueError("output_path 是必需的,不能为空")

    try:
        print(f"提交图像请求,使用 Prompt: {prompt}")
        response = queue_prompt(workflow_id, prompt)
        prompt_id = response["data"]["prompt_id"]

        while True:
            task_info = get_task_info([prompt_id])
            if task_info["code"] != 0:
                raise Exception(f"获取任务信息失败: {task_info['msg']}")

            comfy_task_info = task_info["data"]["comfy_task_info"][0]
            status = comfy_task_info["status"]
            if status == 3:  # 已完成
                break
            elif status == 4:  # 失败
                raise Exception(f"任务失败: {comfy_task_info['errMsg']}")
            time.sleep(5)  # 等待 5 秒后再次检查

        files_dict = comfy_task_info.get("files", {})
        images = get_images(files_dict)
        save_images(images, output_path, save_previews)

        return prompt_id
    except Exception as e:
        print(f"生成图像时发生错误: {e}")
        return None


def prompt_to_image(
    workflow_id=DEFAULT_WORKFLOW_ID,
    prompt=None,
    positive_prompt=None,
    negative_prompt="",
    output_path=None,
    save_previews=False,
):
    """
    根据给定的提示修改工作流并生成图像。
    """
    if not workflow_id:
        raise ValueError("workflow_id是必需的,不能为空")
    if not output_path:
        raise ValueError("output_path是必需的,不能为空")

    try:
        if prompt is None:
            print("工作流的 Base Prompt 为空,直接调用生成函数")
            prompt_id = generate_image_by_prompt(workflow_id, None, output_path, save_previews)
            return None, prompt_id
        else:
            prompt = json.loads(prompt) if isinstance(prompt, str) else prompt
            print("加载工作流 Base Prompt: ", prompt)

            # 使用从节点 ID 到类型的映射 id_to_class_type,找到 CheckpointLoaderSimple 节点数字
            ckpt_name = next(
                (key for key, value in id_to_class_type.items() if value == "CheckpointLoaderSimple"), None
            )
            if ckpt_name is None:
                print("找不到 ckpt_name 节点")
                return None

            # 设置正确的 checkpoint 名称,必须以 GenStudio 返回的 checkpoint 名称为准
            prompt[ckpt_name]["inputs"]["ckpt_name"] = CHECKPOINT_NAME

            # 使用从节点 ID 到类型的映射 id_to_class_type,找到 KSampler 节点数字
            k_sampler = next((key for key, value in id_to_class_type.items() if value == "KSampler"), None)
            if k_sampler is None:
                print("找不到 KSampler 节点")
                return None

            # 为 KSampler 节点设置一个随机种子
            prompt[k_sampler]["inputs"]["seed"] = random.randint(10**14, 10**15 - 1)

            # 获取 positive_input_id 和 negative_input_id
            positive_input_id = next(
                (key for key, value in id_to_class_type.items() if value == "positive_input_id"), None
            )
            negative_input_id = next(
                (key for key, value in id_to_class_type.items() if value == "negative_input_id"), None
            )

            # 更新正面提示
            if positive_input_id is not None:
                prompt[positive_input_id]["inputs"]["text"] = positive_prompt

            # 如果提供了负面提示,则更新负面提示
            if negative_prompt != "" and negative_input_id is not None:
                prompt[negative_input_id]["inputs"]["text"] = negative_prompt

        prompt_id = generate_image_by_prompt(workflow_id, prompt, output_path, save_previews)
        return json.dumps(prompt), prompt_id

    except Exception as e:
        print(f"处理提示时发生错误: {e}")
        return None, None


def generate_image_by_prompt_and_image(
    workflow_id=DEFAULT_WORKFLOW_ID, prompt=None, output_path=DEFAULT_OUTPUT_PATH, save_previews=False
):
    """
    根据提示和输入图像生成新图像并保存到指定路径。
    """
    if not workflow_id:
        raise ValueError("workflow_id 是必需的,不能为空")
    if not output_path:
        raise ValueError("output_path 是必需的,不能为空")

    try:
        print(f"提交图像请求,使用 Prompt: {prompt}")
        response = queue_prompt(workflow_id, prompt)
        prompt_id = response["data"]["prompt_id"]

        while True:
            task_info = get_task_info([prompt_id])
            if task_info["code"] != 0:
                raise Exception(f"获取任务信息失败: {task_info['msg']}")

            comfy_task_info = task_info["data"]["comfy_task_info"][0]
            status = comfy_task_info["status"]
            if status == 3:  # 已完成
                break
            elif status == 4:  # 失败
                raise Exception(f"任务失败: {comfy_task_info['errMsg']}")
            time.sleep(5)  # 等待 5 秒后再次检查

        files_dict = comfy_task_info.get("files", {})
        images = get_images(files_dict)
        save_images(images, output_path, save_previews)

        return prompt_id
    except Exception as e:
        print(f"生成图像时发生错误: {e}")
        return None


# The tutorial's "复制的 GenStudio 托管工作流参数" example (the text-to-image workflow's parameters),
# its long choice lists shortened: only each input's "current" is read by get_prompt_json_body.
api_params_by_genstudio = {
    "3": {
        "inputs": {
            "seed": {"type": "INT", "current": 1, "spec": {"default": 0, "min": 0, "max": 18446744073709552000}},
            "steps": {"type": "INT", "current": 20, "spec": {"default": 20, "min": 1, "max": 10000}},
            "cfg": {
                "type": "FLOAT",
                "current": 7,
                "spec": {"default": 8, "min": 0, "max": 100, "step": 0.1, "round": 0.01},
            },
            "sampler_name": {"type": "LIST", "current": "ddim", "spec": {"choices": ["euler", "ddim"]}},
            "scheduler": {"type": "LIST", "current": "karras", "spec": {"choices": ["normal", "karras"]}},
            "denoise": {"type": "FLOAT", "current": 1, "spec": {"default": 1, "min": 0, "max": 1, "step": 0.01}},
        },
        "class_type": "KSampler",
        "_meta": {"title": "KSampler"},
    },
    "4": {
        "inputs": {
            "ckpt_name": {
                "type": "MODEL",
                "current": "majicMIX realistic 麦橘写实_v7.safetensors",
                "spec": {"choices": ["common/sd1.5/majicMIX realistic 麦橘写实_v7.safetensors"]},
            }
        },
        "class_type": "CheckpointLoaderSimple",
        "_meta": {"title": "Load Checkpoint"},
    },
    "5": {
        "inputs": {
            "width": {"type": "INT", "current": 512, "spec": {"default": 512, "min": 16, "max": 16384, "step": 8}},
            "height": {"type": "INT", "current": 512, "spec": {"default": 512, "min": 16, "max": 16384, "step": 8}},
            "batch_size": {"type": "INT", "current": 1, "spec": {"default": 1, "min": 1, "max": 4096}},
        },
        "class_type": "EmptyLatentImage",
        "_meta": {"title": "Empty Latent Image"},
    },
    "6": {
        "inputs": {"text": {"type": "STRING", "current": "a girl", "spec": {}}},
        "class_type": "CLIPTextEncode",
        "_meta": {"title": "CLIP Text Encode (Prompt)"},
    },
    "7": {
        "inputs": {"text": {"type": "STRING", "current": "", "spec": {}}},
        "class_type": "CLIPTextEncode",
        "_meta": {"title": "CLIP Text Encode (Prompt)"},
    },
}
