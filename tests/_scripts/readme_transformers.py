import torch
from torch import nn
from transformers import TrainingArguments

from famo import FAMOWeighting
from famo.transformers import FAMOTrainer


class TwoTasks(nn.Module):  # a PreTrainedModel works the same way (model.famo = ...)
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
        self.famo = FAMOWeighting(["small", "large"], extra_forward=False)  # in the checkpoints

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = ((self.net(x) - y) ** 2).mean(dim=0)
        return {"task_losses": losses}  # or a dict {"small": ..., "large": ...}


x, y = torch.randn(512, 10), torch.randn(512, 2) * torch.tensor([1.0, 30.0])
args = TrainingArguments(
    "famo-run",
    max_steps=20,
    learning_rate=1e-2,
    per_device_train_batch_size=16,
    gradient_accumulation_steps=2,  # optional: one FAMO window per optimizer step
    logging_steps=5,  # every log has famo/task_weight/... and famo/loss_weight/...
    report_to="none",  # "tensorboard", "wandb", "mlflow", ...: they get the weights too
    label_names=["y"],  # batches with labels: evaluation computes eval_loss
    use_cpu=not torch.cuda.is_available(),
)
data = [{"x": features, "y": targets} for features, targets in zip(x, y, strict=True)]
trainer = FAMOTrainer(model=TwoTasks(), args=args, train_dataset=data, eval_dataset=data[:64])
trainer.train()  # later: trainer.train(resume_from_checkpoint=True) restores FAMO too
print({k: v for k, v in trainer.state.log_history[-2].items() if k.startswith("famo/")})
# {'famo/task_weight/small': ..., 'famo/task_weight/large': ...,
#  'famo/loss_weight/small': ..., 'famo/loss_weight/large': ...}
metrics = trainer.evaluate()  # FAMO records nothing here
print(metrics["eval_loss"])  # FAMO's objective Σ w ℓ, with the weights at the end
