"""The names of the rules and of the laws feedback is drawn from, without torch: what configs and
result tables check against."""

#: The learning rules (see fa_cli.alignment).
METHODS = ("bp", "fa", "dfa", "usf", "brsf", "frsf", "kp", "shallow")
#: How feedback matrices are drawn: the law of the weight's default initialisation, or Glorot's.
INITS = ("default", "xavier")
