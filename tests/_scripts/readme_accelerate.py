import torch
from accelerate import Accelerator
from torch import nn

from famo import FAMOWeighting

accelerator = Accelerator(
    gradient_accumulation_steps=4,
    mixed_precision="bf16",
    cpu=True,  # this example runs on the CPU; drop it to use the GPU
)
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
x, y = torch.randn(512, 10), torch.randn(512, 2) * torch.tensor([1.0, 30.0])
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
model, optimizer, data = accelerator.prepare(model, optimizer, data)

famo = FAMOWeighting(["small", "large"], extra_forward=False)
famo.attach(optimizer)  # learns on real steps only, not on Accelerate's no-op micro-steps
accelerator.register_for_checkpointing(famo)  # in save_state() / load_state()

for inputs, targets in data:
    with accelerator.accumulate(model):
        losses = ((model(inputs) - targets) ** 2).mean(dim=0)
        accelerator.backward(famo.loss(losses))  # the whole integration
        optimizer.step()  # a real step every 4th micro-batch
        optimizer.zero_grad()

accelerator.save_state("checkpoint")  # model, optimizer, RNG states and FAMO
accelerator.load_state("checkpoint")
print(f"weights: {famo.weights_dict(as_floats=True)}")  # z, the task weights
