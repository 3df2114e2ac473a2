"""Test helpers: a finished run directory made without ``multitask train``, in the layout of ``multitask.run``."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from multitask.data import load_split, make_dataset
from multitask.model import build_joint_model, build_single_task_model
from multitask.run import CONFIG_FILE, MODEL_FILE, SPLIT_FILE, save_model, write_json
from multitask.taxonomy import TASKS, load_taxonomy


def make_run(run_dir: Path, *, split_csv: Path, task: str = "joint", image_size: int = 75, epochs: int = 0,
             seed: int = 0) -> Path:
    """Write a finished run (model.keras, split.csv, config.json last) whose model saw ``epochs`` of the train split.

    With ``weights=None`` and a handful of steps, BatchNormalization's moving statistics (momentum 0.99) would
    still be near their initial values and the model would score at chance in inference mode; a low momentum
    lets them follow the data, so four epochs on the synthetic set are well above chance.
    """
    import keras

    keras.utils.set_random_seed(seed)
    tasks = TASKS if task == "joint" else (task,)
    model = _build(task, image_size)
    taxonomy = load_taxonomy()
    if epochs:
        for layer in model.get_layer("backbone").layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.7
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss={t: loss for t in tasks}, jit_compile=False)
        manifest = load_split(split_csv, taxonomy=taxonomy)
        train = make_dataset(manifest[manifest["split"] == "train"], image_size=image_size, batch_size=32,
                             task=task, training=True, seed=seed)
        with warnings.catch_warnings():  # Keras' notes on tf.data input (already shuffled, ends each epoch)
            warnings.simplefilter("ignore", UserWarning)
            model.fit(train.cache(), epochs=epochs, verbose=0)
        trained, model = model, _build(task, image_size)  # an uncompiled copy: no optimizer state in the file
        model.set_weights(trained.get_weights())
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, run_dir / MODEL_FILE)
    shutil.copyfile(split_csv, run_dir / SPLIT_FILE)
    write_json({
        "status": "complete",
        "task": task,
        "tasks": list(tasks),
        "image_size": image_size,
        "labels": {t: list(taxonomy.labels(t)) for t in tasks},
        "taxonomy": taxonomy.to_records(),
        "seed": seed,
        "epochs": epochs,
    }, run_dir / CONFIG_FILE)
    return run_dir


def _build(task: str, image_size: int):
    if task == "joint":
        return build_joint_model(image_size, weights=None)
    return build_single_task_model(task, image_size, weights=None)
