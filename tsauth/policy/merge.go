package policy

import (
	"bytes"
	"strings"

	"github.com/tailscale/hujson"
)

// The merge works on hujson's syntax tree so that packing an untouched tree gives
// back the input byte for byte. Entries are appended at the end of a section; each
// carries its marker comment in the whitespace before it. Two things of the owner's
// can sit where an entry goes, and both are restored on removal:
//   - a comment on the same line after the section's last entry: in a section laid
//     out one entry per line it moves in front of threes' first marker (so it stays
//     on its line) and moves back out on removal; in a one-line section it stays
//     where it is, after threes' entries on the same line;
//   - the section's trailing-comma style: kept by threes' last entry, handed back to
//     the owner's last entry on removal.

// seq is an array or object seen as a list of entries.
type seq interface {
	len() int
	// before is the whitespace and comments before entry i (an object's name).
	before(i int) *hujson.Extra
	// after is the whitespace between entry i and its comma; nil means no comma
	// follows the last entry.
	after(i int) *hujson.Extra
	// tail is the whitespace and comments before the closing bracket.
	tail() *hujson.Extra
	add(item any)
	removeAt(i int)
}

type arraySeq struct{ a *hujson.Array }

func (s arraySeq) len() int                   { return len(s.a.Elements) }
func (s arraySeq) before(i int) *hujson.Extra { return &s.a.Elements[i].BeforeExtra }
func (s arraySeq) after(i int) *hujson.Extra  { return &s.a.Elements[i].AfterExtra }
func (s arraySeq) tail() *hujson.Extra        { return &s.a.AfterExtra }
func (s arraySeq) add(item any)               { s.a.Elements = append(s.a.Elements, item.(hujson.Value)) }
func (s arraySeq) removeAt(i int)             { s.a.Elements = append(s.a.Elements[:i], s.a.Elements[i+1:]...) }

type objectSeq struct{ o *hujson.Object }

func (s objectSeq) len() int                   { return len(s.o.Members) }
func (s objectSeq) before(i int) *hujson.Extra { return &s.o.Members[i].Name.BeforeExtra }
func (s objectSeq) after(i int) *hujson.Extra  { return &s.o.Members[i].Value.AfterExtra }
func (s objectSeq) tail() *hujson.Extra        { return &s.o.AfterExtra }
func (s objectSeq) add(item any)               { s.o.Members = append(s.o.Members, item.(hujson.ObjectMember)) }
func (s objectSeq) removeAt(i int)             { s.o.Members = append(s.o.Members[:i], s.o.Members[i+1:]...) }

// layout is how entries of one section are laid out.
type layout struct {
	multiline bool
	indent    string // before each entry
	closing   string // before the closing bracket
}

// layoutOf infers the layout of s from its entries, or for an empty s from its
// parent's indentation.
func layoutOf(s seq, parentIndent string, parentMultiline bool) layout {
	unit := parentIndent
	if unit == "" {
		unit = "\t"
	}
	l := layout{multiline: parentMultiline, indent: parentIndent + unit, closing: parentIndent}
	if s.len() > 0 {
		l.multiline = false
		for i := s.len() - 1; i >= 0; i-- {
			b := *s.before(i)
			nl := bytes.LastIndexByte(b, '\n')
			if nl < 0 {
				continue
			}
			if !l.multiline {
				l.multiline = true
				if ind := string(b[nl+1:]); isBlank(ind) {
					l.indent = ind
					break
				}
			}
		}
	} else if bytes.IndexByte(*s.tail(), '\n') >= 0 {
		l.multiline = true
	}
	if t := *s.tail(); bytes.IndexByte(t, '\n') >= 0 {
		if ind := string(t[bytes.LastIndexByte(t, '\n')+1:]); isBlank(ind) {
			l.closing = ind
		}
	}
	return l
}

// isBlank reports whether s is only spaces, tabs and carriage returns: the
// indentation or line ending around entries, never an owner's content.
func isBlank(s string) bool { return strings.Trim(s, " \t\r") == "" }

// appendManaged appends items to s, each preceded by a comment holding marker.
func appendManaged(s seq, l layout, marker string, items []any) {
	var head hujson.Extra
	trailing := l.multiline
	if n := s.len(); n == 0 {
		// All of the empty section's inside goes in front of the first marker, so
		// that removing the last entry restores it exactly.
		head = bytes.Clone(*s.tail())
		*s.tail() = nil
		if l.multiline {
			*s.tail() = hujson.Extra("\n" + l.closing)
		}
	} else {
		last := s.after(n - 1)
		trailing = *last != nil
		if !trailing {
			*last = hujson.Extra{} // a comma now follows the owner's last entry
		}
		// On one line the comment already stays on its line, after threes'
		// entries; moved in front of them it would swallow them.
		t := *s.tail()
		if nl := bytes.IndexByte(t, '\n'); l.multiline && nl > 0 && !isBlank(string(t[:nl])) {
			head = bytes.Clone(t[:nl])
			*s.tail() = bytes.Clone(t[nl:])
		}
	}
	for i, item := range items {
		var before hujson.Extra
		if i == 0 {
			before = append(before, head...)
		}
		if l.multiline {
			before = append(before, "\n"+l.indent+"// "+marker+"\n"+l.indent...)
		} else {
			before = append(before, " /* "+marker+" */ "...)
		}
		s.add(item)
		n := s.len()
		*s.before(n - 1) = before
		*s.after(n - 1) = nil
		if i == len(items)-1 && trailing {
			*s.after(n - 1) = hujson.Extra{}
		}
	}
}

// removeManaged removes the entries of s whose marker comment holds marker and for
// which keep, when given, is false, undoing what appendManaged did around them.
func removeManaged(s seq, marker string, alsoIf func(i int) bool) {
	var carry hujson.Extra
	removed, removedLast, lastHadNoComma := false, false, false
	for i := 0; i < s.len(); {
		if hasMarker(*s.before(i), marker) && (alsoIf == nil || alsoIf(i)) {
			carry = append(carry, prefixBeforeMarker(*s.before(i), marker)...)
			removed = true
			if i == s.len()-1 {
				removedLast, lastHadNoComma = true, *s.after(i) == nil
			}
			s.removeAt(i)
			continue
		}
		if len(carry) > 0 {
			*s.before(i) = joinExtra(carry, *s.before(i))
			carry = nil
		}
		i++
	}
	if !removed {
		return
	}
	if s.len() == 0 {
		*s.tail() = joinExtra(carry, nil)
		return
	}
	if removedLast {
		// The new last entry takes over the removed one's trailing-comma style.
		last := s.after(s.len() - 1)
		switch {
		case lastHadNoComma:
			if len(*last) > 0 {
				*s.tail() = append(bytes.Clone(*last), *s.tail()...)
			}
			*last = nil
		case *last == nil:
			*last = hujson.Extra{}
		}
	}
	if len(carry) > 0 {
		*s.tail() = joinExtra(carry, *s.tail())
	}
}

// joinExtra returns a followed by b, with a line break between them if a ends in
// a line comment that would otherwise swallow what follows.
func joinExtra(a, b hujson.Extra) hujson.Extra {
	out := bytes.Clone(a)
	if endsInLineComment(a) && !bytes.HasPrefix(b, []byte("\n")) && !bytes.HasPrefix(b, []byte("\r\n")) {
		out = append(out, '\n')
	}
	return append(out, b...)
}

// endsInLineComment reports whether the whitespace-and-comments extra ends inside
// a "//" comment, one not yet closed by a line break.
func endsInLineComment(extra []byte) bool {
	for i := 0; i < len(extra); i++ {
		switch {
		case bytes.HasPrefix(extra[i:], []byte("//")):
			nl := bytes.IndexByte(extra[i:], '\n')
			if nl < 0 {
				return true
			}
			i += nl
		case bytes.HasPrefix(extra[i:], []byte("/*")):
			end := bytes.Index(extra[i+2:], []byte("*/"))
			if end < 0 {
				return false // not valid HuJSON; leave it to the parser to complain
			}
			i += 2 + end + 1
		}
	}
	return false
}

// markerAt returns the offset of marker in extra where it is a whole token, or -1.
func markerAt(extra []byte, marker string) int {
	for off := 0; ; {
		i := bytes.Index(extra[off:], []byte(marker))
		if i < 0 {
			return -1
		}
		end := off + i + len(marker)
		if end == len(extra) || !isTagByte(extra[end]) {
			return off + i
		}
		off = end
	}
}

func isTagByte(c byte) bool {
	return c == '-' || c == ':' || c == '_' || c == '.' ||
		'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

func hasMarker(extra []byte, marker string) bool { return markerAt(extra, marker) >= 0 }

// prefixBeforeMarker returns what precedes the marker comment and the line break
// and indentation threes put in front of it: the owner's bytes, if any.
func prefixBeforeMarker(extra []byte, marker string) []byte {
	at := markerAt(extra, marker)
	cut := max(bytes.LastIndex(extra[:at], []byte("//")), bytes.LastIndex(extra[:at], []byte("/*")))
	if cut < 0 {
		cut = at
	}
	for cut > 0 && (extra[cut-1] == ' ' || extra[cut-1] == '\t') {
		cut--
	}
	// threes writes a bare "\n"; a '\r' before it is the end of the owner's
	// line (a same-line comment moved in front of the marker) and stays theirs.
	if cut > 0 && extra[cut-1] == '\n' {
		cut--
	}
	return bytes.Clone(extra[:cut])
}
