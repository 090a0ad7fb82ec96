package sshd

import (
	"fmt"
	"strings"
)

// refused are the characters a shell would act on. No shell runs here, so rather
// than pass them on as plain characters (and let `vm all | grep x` quietly mean
// something else) a command holding one outside quotes is refused.
const refused = ";|&$<>()`\\"

// Split turns an SSH command line into words the way a person expects from a shell,
// and no further: blanks separate words, single or double quotes keep a word whole
// (everything inside is literal, quotes included of the other kind), and nothing is
// expanded, globbed or run. A shell metacharacter outside quotes, a control
// character anywhere (a line break included: a shell would start a new command) or
// an unclosed quote is an error naming it.
func Split(line string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord := false
	var quote rune
	for i, r := range line {
		if r < 0x20 && r != '\t' || r == 0x7f {
			return nil, fmt.Errorf("control character %q at byte %d: not allowed in a command", r, i)
		}
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
				continue
			}
			cur.WriteRune(r)
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		case strings.ContainsRune(refused, r):
			return nil, fmt.Errorf("%q at byte %d: there is no shell here, so pipes, redirections, variables and command lists do not work; quote it if you meant the character itself", string(r), i)
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("unclosed %c quote", quote)
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}

// logWords returns the leading words of a command that name it (and the VM it is
// about), stopping at the first flag or KEY=VALUE word: values, secret ones among
// them, travel in flags and KEY=VALUE words and stay out of the log.
func logWords(args []string) string {
	var out []string
	for _, a := range args {
		if len(out) == 4 || strings.HasPrefix(a, "-") || strings.ContainsAny(a, "= ") {
			break
		}
		out = append(out, a)
	}
	if len(out) < len(args) {
		out = append(out, "…")
	}
	return strings.Join(out, " ")
}
