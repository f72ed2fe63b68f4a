"""A small model with every base kind PEFT's LoRA adapts (nn.Embedding, nn.Conv1d/2d/3d,
nn.MultiheadAttention, nn.Linear), plus modules that cannot be adapted."""
import torch
import torch.nn as nn

# Every adaptable module of Toy.
TARGETS = ["embed", "conv1", "conv2", "conv3", "attn", "head"]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.conv1 = nn.Conv1d(12, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv3 = nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.norm = nn.LayerNorm(12)
        self.grouped = nn.Conv1d(12, 12, 1, groups=2)
        self.head = nn.Linear(12, 5)

    def forward(self, ids):
        h = self.embed(ids)  # [b, t, 12]
        h = h + self.conv1(h.transpose(1, 2)).transpose(1, 2)
        img = self.conv2(h[:, None])  # [b, 4, t, 12]
        vol = self.conv3(img[:, :, None]).mean(dim=(1, 2))  # [b, t, 12]
        h = h + vol
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm(h)).mean(dim=1)


def toy(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return Toy().to(dtype)


def toy_ids(seed=1, batch=4, length=6):
    return torch.randint(0, 30, (batch, length), generator=torch.Generator().manual_seed(seed))
