"""A faithful single-process re-implementation of the seed's BiEncoderModel maths (REFERENCE.md).

Used only as the oracle in equivalence tests: left-padded inputs, hidden state at
position -1, no position ids, gather-free (one process holds the global batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SeedBiEncoder(torch.nn.Module):
    def __init__(self, model, normlized=False, temperature=1.0, sub_batch_size=-1):
        super().__init__()
        self.model = model
        self.normlized = normlized
        self.temperature = temperature if normlized else 1.0
        self.sub_batch_size = sub_batch_size
        self.cross_entropy = torch.nn.CrossEntropyLoss(reduction="mean")

    def _encode_one(self, features):
        out = self.model(input_ids=features["input_ids"], attention_mask=features["attention_mask"], return_dict=True)
        reps = out.last_hidden_state[:, -1]
        if self.normlized:
            reps = F.normalize(reps, dim=-1)
        return reps.contiguous()

    def encode(self, features):
        if self.sub_batch_size > 0:
            n = features["input_ids"].shape[0]
            parts = []
            for i in range(0, n, self.sub_batch_size):
                parts.append(self._encode_one({k: v[i : i + self.sub_batch_size] for k, v in features.items()}))
            return torch.cat(parts, 0)
        return self._encode_one(features)

    def forward(self, query, passage, messages, teacher_scores=None):
        q_reps, p_reps = self.encode(query), self.encode(passage)
        group_size = p_reps.size(0) // q_reps.size(0)
        if messages[0] == "normal":
            scores = q_reps @ p_reps.T / self.temperature
            scores = scores.view(q_reps.size(0), -1)
            target = torch.arange(scores.size(0), dtype=torch.long) * group_size
            loss = self.cross_entropy(scores, target)
            if teacher_scores is not None:
                teacher = torch.tensor(teacher_scores, dtype=scores.dtype).view(q_reps.size(0), -1)
                teacher_targets = torch.softmax(teacher.detach(), dim=-1)
                local = torch.stack([scores[i, i * group_size : (i + 1) * group_size] for i in range(q_reps.size(0))])
                loss = loss + -torch.mean(torch.sum(torch.log_softmax(local, dim=-1) * teacher_targets, dim=-1))
        else:
            local = torch.stack(
                [q_reps[i] @ p_reps[i * group_size : (i + 1) * group_size].T for i in range(q_reps.size(0))]
            ) / self.temperature
            target = torch.zeros(q_reps.size(0), dtype=torch.long)
            loss = self.cross_entropy(local, target)
            scores = local
        return loss, scores, q_reps, p_reps
