"""Train the same sequence model with timerec_fast.LSTM and with torch.nn.LSTM, side by side.

Task (generated, no data needed): variable-length sequences of noisy tokens; predict the class of
the first token (the model must carry it through the whole sequence). Both models
start from identical weights, see identical batches (packed, variable length), and are timed in the
same process.

    python examples/train_lstm_synthetic.py [--epochs 4] [--threads 2]
"""
import argparse
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import timerec_fast


def make_data(n, max_len, num_classes, feature_dim, generator):
    lengths = torch.randint(max_len // 4, max_len + 1, (n,), generator=generator)
    tokens = torch.randint(0, num_classes, (n, max_len), generator=generator)
    embed = torch.randn(num_classes, feature_dim, generator=generator)
    x = embed[tokens] + 0.3 * torch.randn(n, max_len, feature_dim, generator=generator)
    return x, lengths, tokens[:, 0]


class Classifier(nn.Module):
    def __init__(self, rnn_cls, feature_dim, hidden, num_classes):
        super().__init__()
        self.rnn = rnn_cls(feature_dim, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.rnn(packed)
        return self.head(h_n[-1])


def train(model, data, epochs, batch_size, label):
    x, lengths, y = data
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    epoch_times = []
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        t0 = time.perf_counter()
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx], lengths[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        epoch_times.append(time.perf_counter() - t0)
        print(f"  [{label}] epoch {epoch + 1}: loss {total / len(y):.4f}  "
              f"{epoch_times[-1]:.2f} s")
    return epoch_times


@torch.no_grad()
def accuracy(model, data):
    x, lengths, y = data
    return (model(x, lengths).argmax(1) == y).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    feature_dim, hidden, classes, max_len = 32, 64, 8, 40
    train_data = make_data(args.samples, max_len, classes, feature_dim, g)
    test_data = make_data(1024, max_len, classes, feature_dim, g)

    torch.manual_seed(0)
    ref = Classifier(nn.LSTM, feature_dim, hidden, classes)
    fused = Classifier(timerec_fast.LSTM, feature_dim, hidden, classes)
    fused.load_state_dict(ref.state_dict())  # identical starting weights

    print(f"training a 2-layer LSTM classifier ({args.samples} packed sequences, "
          f"length {max_len // 4}..{max_len}, hidden {hidden}, {args.threads} threads)")
    t_fused = train(fused, train_data, args.epochs, 128, "timerec_fast.LSTM")
    t_ref = train(ref, train_data, args.epochs, 128, "torch.nn.LSTM    ")
    acc_fused, acc_ref = accuracy(fused, test_data), accuracy(ref, test_data)

    med = lambda ts: sorted(ts)[len(ts) // 2]
    print()
    print(f"{'':22}{'s/epoch (median)':>18}{'test accuracy':>16}")
    print(f"{'timerec_fast.LSTM':22}{med(t_fused):>18.2f}{acc_fused:>16.3f}")
    print(f"{'torch.nn.LSTM':22}{med(t_ref):>18.2f}{acc_ref:>16.3f}")
    print(f"training speedup (torch.nn time / ours): {med(t_ref) / med(t_fused):.2f}x")


if __name__ == "__main__":
    main()
