"""Time-aware next-item recommendation on the fused recurrent cells.

Modules (one place per thing):

* :mod:`.data`       -- read/clean logs (CSV/TSV, MovieLens, RecBole, DIGINETICA, Parquet), id maps
* :mod:`.sequences`  -- splits (leave-one-out by time, global time), time features, packed batches
* :mod:`.models`     -- TimeLSTM / GRU / LSTM recommenders (tied embeddings), popularity
* :mod:`.train`      -- training loop, early stopping, atomic checkpoints, resume, DDP
* :mod:`.evaluate`   -- full-ranking HR/NDCG/MRR/Precision/Recall/F1 @K with fair tie handling
* :mod:`.serve`      -- ``Recommender``: recommend, O(1) online update, batch scoring, explain
* :mod:`.synth`      -- synthetic log with real temporal structure (``timerec demo``)
* :mod:`.cli`        -- the ``timerec`` command
"""
from .errors import CheckpointError, DataError, RecsysError
from .data import InteractionData, load_data
from .sequences import leave_one_out, time_split
from .train import TrainConfig
from .serve import Recommender

# the functions train.train and evaluate.evaluate are not re-exported here: that would shadow
# their modules (timerec_fast.recsys.train / .evaluate)
__all__ = ["CheckpointError", "DataError", "RecsysError", "InteractionData", "load_data", "leave_one_out",
           "time_split", "TrainConfig", "Recommender"]
