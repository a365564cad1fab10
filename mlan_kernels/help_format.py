"""The --help layout of every command of this package (console scripts and python/*.py).

Each option line ends with its default: "(default: X)" is appended unless the help text
already says it in words, as "(default: ...)" (for an option whose stored default is None,
e.g. "(default: bfloat16 on cuda, float32 on cpu)"). Descriptions and epilogs keep their line breaks.
"""
import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                            argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text:
            return text
        return super()._get_help_string(action)
