"""The DenseSSM idea, once for every family: the stack that passes each layer what the layers below hand up
(``stack``), the contract a family's mixer meets (``mixer``), the selective-transition gate and hidden fusion
(``gate``), and the task heads (``heads``)."""
