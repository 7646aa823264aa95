import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import TrainingArguments

from famo import FAMOWeighting
from famo.transformers import FAMOTrainer


class TwoTasks(nn.Module):  # a PreTrainedModel works the same way
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
        self.famo = FAMOWeighting(["small", "large"], extra_forward=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"task_losses": ((self.net(x) - y) ** 2).mean(dim=0)}


def lora_model() -> nn.Module:
    torch.manual_seed(0)  # the same base weights each time (a pretrained model)
    config = LoraConfig(r=4, target_modules=["net.0", "net.2"])
    return get_peft_model(TwoTasks(), config)


def fit(folder: str, resume_from: str | None = None) -> FAMOTrainer:
    args = TrainingArguments(
        folder,
        max_steps=10,
        save_steps=5,  # checkpoint-5 holds the adapter, and FAMO's state beside it
        learning_rate=1e-2,
        per_device_train_batch_size=16,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = FAMOTrainer(model=lora_model(), args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


torch.manual_seed(1)
x, y = torch.randn(256, 10), torch.randn(256, 2) * torch.tensor([1.0, 30.0])
data = [{"x": features, "y": targets} for features, targets in zip(x, y, strict=True)]
straight = fit("run")  # 10 steps without a stop
resumed = fit("resumed", resume_from="run/checkpoint-5")  # a new process, from step 5
# FAMO resumed where it stopped: it ends exactly where the run that never stopped ends.
assert torch.equal(resumed.famo.logits, straight.famo.logits)
print(resumed.famo.weights_dict(as_floats=True))  # z, the task weights
