"""A BERT encoder with kdlib's mean-pooled classification head, as a transformers model.

kdlib writes this file beside the checkpoints of teachers it trained with `encoder.pooling: mean`, so that
plain transformers loads them: AutoModelForSequenceClassification.from_pretrained(folder,
trust_remote_code=True), or pipeline("text-classification", model=folder, trust_remote_code=True).
The head: the mean of the last hidden states over the attention mask, dense + tanh, then a linear layer
(kdlib.branched.Head). It imports nothing from kdlib.
"""

import torch
from torch import nn
from transformers import BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class KdlibBertForSequenceClassification(BertPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.pool_dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        logits = self.classifier(self.dropout(torch.tanh(self.pool_dense(self.dropout(pooled)))))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
